//! The figures of `imbench rebalance`: the report records, the printed
//! tables and the ratios of the JSON file.

use crate::{rebalance_check::Check, rebalance_load::WindowStats, report::fmt_rate};
use serde::Serialize;
use std::fmt::Write as _;

/// The ratios the issue asks for (of the add-shard migration).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// (users moved / users total) / (1 / (n + 1)).
    pub moved_vs_ideal: Option<f64>,
    /// The load's appends/s during the migration / before it.
    pub load_during_vs_before: Option<f64>,
}

/// One migration: what moved, how fast, and the load around it.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    pub kind: String,
    pub shards_before: usize,
    pub shards_after: usize,
    /// Users with a mailbox when it started.
    pub users_total: u64,
    /// Users the survey before the move said would move, and of them those
    /// moving between two shards that are in both maps (ideally 0).
    pub planned_users: u64,
    pub moved_between_kept_shards: u64,
    pub users_moved: u64,
    pub bytes_moved: u64,
    pub records_moved: u64,
    /// Seconds of `move_all` alone, and of the whole migration (routing
    /// installs included: the "during" load window).
    pub move_secs: f64,
    pub total_secs: f64,
    pub users_per_s: f64,
    pub mb_per_s: f64,
    pub moved_fraction: f64,
    pub ideal_fraction: f64,
    pub moved_vs_ideal: f64,
    pub load_before: WindowStats,
    pub load_during: WindowStats,
    pub load_during_vs_before: Option<f64>,
    #[serde(skip)]
    pub windows: (usize, usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct Prefilled {
    pub users: u64,
    pub messages: u64,
    pub acked: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebalanceReport {
    pub ratios: Ratios,
    /// Of the add-shard migration: users and MB moved per second of
    /// `move_all`.
    pub users_per_s: Option<f64>,
    pub mb_per_s: Option<f64>,
    pub config: serde_json::Value,
    pub prefill: Prefilled,
    pub migrations: Vec<Migration>,
    /// Every load window in order (the first is the unmeasured warm-up).
    pub windows: Vec<WindowStats>,
    pub check: Check,
}

impl RebalanceReport {
    /// The report; the ratios and rates are those of the first migration
    /// (the added shard).
    pub fn new(
        config: serde_json::Value,
        prefill: Prefilled,
        migrations: Vec<Migration>,
        windows: Vec<WindowStats>,
        check: Check,
    ) -> RebalanceReport {
        let add = migrations.first();
        RebalanceReport {
            ratios: Ratios {
                moved_vs_ideal: add.map(|m| m.moved_vs_ideal),
                load_during_vs_before: add.and_then(|m| m.load_during_vs_before),
            },
            users_per_s: add.map(|m| m.users_per_s),
            mb_per_s: add.map(|m| m.mb_per_s),
            config,
            prefill,
            migrations,
            windows,
            check,
        }
    }

    /// The printed tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nload: {} writers + {} drainers routing by the old map (following Moved, \
             retrying Busy)",
            self.config["writers"], self.config["drainers"]
        );
        self.render_windows(&mut out);
        self.render_migrations(&mut out);
        let c = &self.check;
        let _ = writeln!(
            out,
            "\ncheck: {} users at their new owners ({} listed), {} messages present, {} \
             acknowledged appends ({} drained): lost {}, duplicated {}, misplaced {}, seq gaps \
             {}, phantom {}, resurrected {}, users at a wrong shard {}",
            c.users_checked,
            c.users_listed,
            c.messages_present,
            c.acknowledged_appends,
            c.drained,
            c.lost,
            c.duplicated,
            c.misplaced,
            c.seq_gaps,
            c.phantom,
            c.resurrected,
            c.users_at_wrong_shard
        );
        let _ = writeln!(out, "\nratios (add-shard):");
        for (name, v) in [
            ("moved_vs_ideal", show(self.ratios.moved_vs_ideal)),
            (
                "load_during_vs_before",
                show(self.ratios.load_during_vs_before),
            ),
            (
                "users_per_s",
                self.users_per_s.map_or("n/a".into(), fmt_rate),
            ),
            ("mb_per_s", show(self.mb_per_s)),
        ] {
            let _ = writeln!(out, "  {name:<24} {v}");
        }
        out
    }

    fn render_windows(&self, out: &mut String) {
        const WIDTHS: [usize; 10] = [21, 6, 10, 8, 8, 9, 8, 8, 8, 6];
        let header = [
            "window",
            "secs",
            "appends/s",
            "p50 us",
            "p99 us",
            "drains/s",
            "moved",
            "busy",
            "refused",
            "ckpts",
        ];
        row(out, &WIDTHS, header.map(String::from));
        for w in &self.windows {
            let cells = [
                w.name.clone(),
                format!("{:.1}", w.seconds),
                fmt_rate(w.appends_per_s),
                w.append_latency.p50_us.to_string(),
                w.append_latency.p99_us.to_string(),
                fmt_rate(w.drain_cycles_per_s),
                w.moved_redirects.to_string(),
                w.busy_retries.to_string(),
                (w.refused + w.link_errors).to_string(),
                w.checkpoints.map_or("?".into(), |c| c.to_string()),
            ];
            row(out, &WIDTHS, cells);
        }
        for w in &self.windows {
            if let Some(problem) = &w.first_problem {
                let _ = writeln!(out, "  {}: first problem: {problem}", w.name);
            }
        }
    }

    fn render_migrations(&self, out: &mut String) {
        const WIDTHS: [usize; 9] = [16, 8, 8, 9, 8, 8, 9, 7, 7];
        let inflight = self.config["move_inflight"]
            .as_u64()
            .unwrap_or(msgstore::rebalance::MOVES_INFLIGHT_DEFAULT as u64);
        let mover = format!("Mover::move_all, {inflight} at once");
        let _ = writeln!(out, "\nmoved with {mover}, shards fsync always");
        let header = [
            "migration",
            "users",
            "moved",
            "fraction",
            "ideal",
            "vs ideal",
            "users/s",
            "MB/s",
            "secs",
        ];
        row(out, &WIDTHS, header.map(String::from));
        for m in &self.migrations {
            let cells = [
                m.kind.clone(),
                m.users_total.to_string(),
                m.users_moved.to_string(),
                format!("{:.4}", m.moved_fraction),
                format!("{:.4}", m.ideal_fraction),
                format!("{:.3}", m.moved_vs_ideal),
                fmt_rate(m.users_per_s),
                format!("{:.2}", m.mb_per_s),
                format!("{:.2}", m.move_secs),
            ];
            row(out, &WIDTHS, cells);
            let _ = writeln!(
                out,
                "  {} records, {:.1} MB; planned {} users, {} between kept shards; load \
                 during/before {}",
                m.records_moved,
                m.bytes_moved as f64 / 1e6,
                m.planned_users,
                m.moved_between_kept_shards,
                show(m.load_during_vs_before)
            );
        }
    }
}

/// One table line: the first cell left-aligned, the others right-aligned.
fn row<const N: usize>(out: &mut String, widths: &[usize; N], cells: [String; N]) {
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        let _ = match i {
            0 => write!(out, "{cell:<width$}"),
            _ => write!(out, " {cell:>width$}"),
        };
    }
    out.push('\n');
}

fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_serialize_with_exactly_the_two_keys() {
        let v = serde_json::to_value(Ratios::default()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["load_during_vs_before", "moved_vs_ideal"]);
    }

    #[test]
    fn rows_align_their_cells() {
        let mut out = String::new();
        row(&mut out, &[4, 3], ["ab".into(), "7".into()]);
        assert_eq!(out, "ab     7\n");
    }
}
