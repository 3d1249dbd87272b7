//! Driving a program in a real terminal: a private tmux server, keys sent
//! with `send-keys`, the screen read with `capture-pane`.

use std::{
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Terminals started by this process so far: each gets a tmux server of
/// its own, so tests (and two terminals of one test) run side by side.
static STARTED: AtomicUsize = AtomicUsize::new(0);

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Run `command` (a shell command line) in a new 120x40 terminal.
    pub fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!(
                "imctl-test-{}-{}",
                std::process::id(),
                STARTED.fetch_add(1, Ordering::Relaxed)
            ),
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "120",
            "-y",
            "40",
            command,
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux must be installed (apt-get install tmux; .ci/run installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Type `text` literally (no Enter).
    pub fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", "t", "-l", text]);
    }

    pub fn enter(&self) {
        self.run(&["send-keys", "-t", "t", "Enter"]);
    }

    /// Type `text` and Enter.
    pub fn line(&self, text: &str) {
        self.type_text(text);
        self.enter();
    }

    /// The terminal's visible text.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-t", "t", "-p"])
    }

    /// Everything the terminal showed: the lines scrolled off the top,
    /// then the visible ones (lines the terminal wrapped joined again).
    pub fn history(&self) -> String {
        self.run(&["capture-pane", "-t", "t", "-p", "-J", "-S", "-"])
    }

    /// Wait (up to 20 s) until the terminal has shown `text` (visible or
    /// scrolled off); the history.
    pub fn wait_for(&self, text: &str) -> String {
        self.wait_until(&format!("{text:?}"), |screen| screen.contains(text))
    }

    /// Wait (up to 20 s) until `done` holds for the whole history
    /// ([`Tmux::history`]); the history. `what` says what was awaited.
    pub fn wait_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let history = self.history();
            if done(&history) {
                return history;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what}; it shows:\n{history}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (up to 20 s) until the program in the terminal has exited.
    pub fn wait_exit(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Command::new("tmux")
            .args(["-L", &self.socket, "has-session", "-t", "t"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < deadline, "the program did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
