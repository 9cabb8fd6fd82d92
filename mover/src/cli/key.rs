//! `mover key list|add|remove|passwd`: the repository's passwords.

use mover::repo::RepoArgs;
use mover::secrets::{env_password, read_password_file, Password};
use mover_engine::timeutil::fmt_time;
use mover_format::crypto::KdfParams;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List the key files (the current one marked *).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a password; the new one from MOVER_NEW_PASSWORD or --new-password-file.
    Add {
        /// File holding the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
        /// Print the new key's id as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key file by id.
    Remove {
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the password: add a key with the new password, remove the current one.
    Passwd {
        /// File holding the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
        /// Print the old and new key ids as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn new_password(file: &Option<PathBuf>) -> anyhow::Result<Password> {
    match file {
        Some(f) => Ok(read_password_file(f, "new password file")?),
        None => env_password("MOVER_NEW_PASSWORD").ok_or_else(|| anyhow::anyhow!("no new password: set MOVER_NEW_PASSWORD or use --new-password-file")),
    }
}

pub async fn run(ra: &RepoArgs, cmd: Cmd, cancel: &CancellationToken) -> anyhow::Result<()> {
    let repo = ra.open(cancel).await?;
    match cmd {
        Cmd::List { json } => {
            let keys = repo.list_keys(cancel).await?;
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|(id, k)| serde_json::json!({"id": id, "current": *id == repo.key_id(), "created_unix": k.created_unix, "hostname": k.hostname}))
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                for (id, k) in &keys {
                    println!("{} {id} {} {}", if *id == repo.key_id() { "*" } else { " " }, fmt_time(k.created_unix.saturating_mul(1000)), k.hostname);
                }
            }
        }
        Cmd::Add { new_password_file, json } => {
            let np = new_password(&new_password_file)?;
            let id = repo.add_key(&ra.password()?, &np, KdfParams::default(), cancel).await?;
            if json {
                println!("{}", serde_json::json!({"added": id.to_string()}));
            } else {
                println!("added key {id}");
            }
        }
        Cmd::Remove { id, json } => {
            let id = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            repo.remove_key(&id, cancel).await?;
            if json {
                println!("{}", serde_json::json!({"removed": id.to_string()}));
            } else {
                println!("removed key {id}");
            }
        }
        Cmd::Passwd { new_password_file, json } => {
            let np = new_password(&new_password_file)?;
            let (old, new) = mover_engine::maint::keys::passwd(&repo, ra.storage(cancel).await?, &ra.password()?, &np, KdfParams::default(), cancel).await?;
            if json {
                println!("{}", serde_json::json!({"removed": old.to_string(), "added": new.to_string()}));
            } else {
                println!("password changed: key {old} replaced by {new}");
            }
        }
    }
    Ok(())
}
