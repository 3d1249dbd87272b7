//! `DATA/demo.toml`: what `imctl up` writes for the person trying the
//! system (the gateway's address and public key, the demo users and their
//! generated passwords), and what `imctl chat`, `send` and `inbox` read.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEMO_FILE: &str = "demo.toml";
/// Where `imctl up` keeps its data unless told otherwise.
pub const DATA_DIR_DEFAULT: &str = "data";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demo {
    /// The gateway's UDP address.
    pub gateway: String,
    /// The gateway's static public key, hex.
    pub public_key: String,
    pub users: Vec<DemoUser>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoUser {
    pub name: String,
    pub password: String,
}

pub fn path(data: &Path) -> PathBuf {
    data.join(DEMO_FILE)
}

impl Demo {
    pub fn load(data: &Path) -> anyhow::Result<Demo> {
        let p = path(data);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {} (start the system with `imctl up` first)",
                p.display()
            )
        })?;
        toml::from_str(&text).with_context(|| format!("bad {}", p.display()))
    }

    pub fn save(&self, data: &Path) -> anyhow::Result<()> {
        let p = path(data);
        let text = toml::to_string_pretty(self).expect("a demo file always serializes");
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    }

    pub fn password_of(&self, name: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.password.as_str())
    }

    pub fn public_key(&self) -> anyhow::Result<[u8; 32]> {
        gateway::keys::from_hex(&self.public_key)
            .context("demo.toml: public_key is not 64 hex digits")
    }
}
