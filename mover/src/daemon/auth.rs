//! Who may call what (`docs/security.md`). A caller is identified by its transport:
//!
//! - over the unix socket, by its uid (the kernel's `SO_PEERCRED`): the daemon's own uid,
//!   root, `socket_allowed_uids` and members of `socket_group` (as primary group) may
//!   connect at all; the socket file is 0600 (or 0660 with that group) besides;
//! - over mTLS, by its certificate: every URI and DNS subject alternative name, and the
//!   subject's common name;
//! - over plaintext TCP (loopback only, unless `insecure_plaintext`), as `anonymous`.
//!
//! With an `[authorization]` section, each RPC group (backup, restore, read) admits only
//! the identities it lists (`uid:1000`, `spiffe://cluster/ns/backup/sa/scheduler`,
//! `scheduler.backup.svc`, `anonymous`). Without one, every caller the transport admits may
//! call everything. Cancelling a transfer needs the group of its kind, or being the caller
//! that started it.

use super::Daemon;
use tonic::{Request, Status};

/// The RPCs a permission covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// StartBackup (and cancelling backups); ProtectSnapshot.
    Backup,
    /// StartRestore (and cancelling restores); starting and stopping exports, and
    /// connecting to an export over TLS.
    Restore,
    /// Get, Watch, List transfers; list and get snapshots; list exports.
    Read,
}

impl Group {
    fn as_str(self) -> &'static str {
        match self {
            Group::Backup => "backup",
            Group::Restore => "restore",
            Group::Read => "read",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Every identity the caller proved; the first names it in records and logs.
    pub identities: Vec<String>,
}

impl Caller {
    pub fn name(&self) -> String {
        self.identities.first().cloned().unwrap_or_else(|| "anonymous".into())
    }
}

/// The identities in a DER certificate: URI and DNS subject alternative names, then the
/// subject's common name.
pub(crate) fn cert_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => out.push(u.to_string()),
                GeneralName::DNSName(d) => out.push(d.to_string()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(s.to_string());
        }
    }
    out
}

/// Identifies the caller of `req` and checks it may call RPCs of `group`.
pub fn authorize<T>(d: &Daemon, req: &Request<T>, group: Group) -> Result<Caller, Status> {
    let caller = identify(d, req)?;
    if allowed(d, &caller, group) {
        Ok(caller)
    } else {
        Err(Status::permission_denied(format!("caller {} may not call {} RPCs on this node", caller.identities.join(" / "), group.as_str())))
    }
}

/// Whether `caller` may call RPCs of `group` (always, without an `[authorization]` section).
pub fn allowed(d: &Daemon, caller: &Caller, group: Group) -> bool {
    permits(d.cfg.authorization.as_ref(), &caller.identities, group)
}

/// The rule itself: without an `[authorization]` section everyone the transport admits;
/// with one, any of `identities` listed for `group`. (Also the rule for NBD-TLS clients.)
pub fn permits(authorization: Option<&super::config::AuthConfig>, identities: &[String], group: Group) -> bool {
    let Some(a) = authorization else { return true };
    let list = match group {
        Group::Backup => &a.backup,
        Group::Restore => &a.restore,
        Group::Read => &a.read,
    };
    identities.iter().any(|i| list.contains(i))
}

/// Whether a process of `uid`/`gid` may use the daemon's unix sockets at all: the daemon's
/// own uid, root, `socket_allowed_uids`, or `socket_group` as its primary group.
fn socket_peer(cfg: &super::config::DaemonConfig, uid: u32, gid: u32) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    if uid == me || uid == 0 || cfg.socket_allowed_uids.contains(&uid) || cfg.socket_group == Some(gid) {
        Ok(())
    } else {
        Err(format!("uid {uid} may not use this daemon's socket (socket_allowed_uids, socket_group)"))
    }
}

/// Who may connect to a unix-socket export: whoever may use the daemon's socket *and* call
/// `restore` RPCs as `uid:N` — the right that starting the export needed.
pub fn export_peers(cfg: &super::config::DaemonConfig) -> crate::nbd::server::PeerCheck {
    let cfg = cfg.clone();
    crate::nbd::server::PeerCheck(std::sync::Arc::new(move |uid, gid| {
        socket_peer(&cfg, uid, gid)?;
        if permits(cfg.authorization.as_ref(), &[format!("uid:{uid}")], Group::Restore) {
            Ok(())
        } else {
            Err(format!("uid:{uid} may not read exports (restore)"))
        }
    }))
}

fn identify<T>(d: &Daemon, req: &Request<T>) -> Result<Caller, Status> {
    if let Some(info) = req.extensions().get::<tonic::transport::server::UdsConnectInfo>() {
        let Some(cred) = info.peer_cred else {
            return Err(Status::permission_denied("the peer's credentials on the unix socket are unknown"));
        };
        let (uid, gid) = (cred.uid(), cred.gid());
        if let Err(why) = socket_peer(&d.cfg, uid, gid) {
            tracing::warn!("refused a call on the unix socket from uid {uid} gid {gid}");
            return Err(Status::permission_denied(why));
        }
        return Ok(Caller { identities: vec![format!("uid:{uid}")] });
    }
    if let Some(certs) = req.peer_certs() {
        let ids = certs.first().map(|c| cert_identities(c.as_ref())).unwrap_or_default();
        if ids.is_empty() {
            return Err(Status::permission_denied("the client certificate names no identity (no SAN, no CN)"));
        }
        return Ok(Caller { identities: ids });
    }
    Ok(Caller { identities: vec!["anonymous".into()] })
}
