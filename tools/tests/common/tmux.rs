//! Driving a program in a real terminal: a private tmux server, keys sent
//! with `send-keys`, the screen read with `capture-pane`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Run `command` (a shell command line) in a new 120x40 terminal.
    pub fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("imctl-test-{}", std::process::id()),
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

    /// The terminal's visible text.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-t", "t", "-p"])
    }

    /// Wait (up to 20 s) until the screen shows `text`; the screen.
    pub fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {text:?}; it shows:\n{screen}"
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
