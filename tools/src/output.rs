//! Printing results as human-readable text or as JSON (`--json`).

use serde::Serialize;

/// Where and how subcommands print their results.
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Print `value` as one JSON document, or `human()` as text.
    pub fn emit<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(value)?);
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{}", text.trim_end_matches('\n'));
            }
        }
        Ok(())
    }
}
