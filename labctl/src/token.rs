//! The operator token of a native lab: `<state-dir>/admin.token`, readable
//! by its owner only. `labctl up` makes one (or keeps the one a previous run
//! made, or the one configured), every process gets it through the config
//! file, and the labctl commands that call operator endpoints read it here.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use lab_common::config::AdminToken;
use rand::Rng;

/// Where a lab's token lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}

/// The token for a lab starting in `state_dir`: `configured` if set, else
/// the one already in the state dir, else a new random one; written back to
/// the state dir either way.
pub fn ensure(state_dir: &Path, configured: &AdminToken) -> std::io::Result<AdminToken> {
    let token = if configured.is_set() {
        configured.clone()
    } else {
        match read(state_dir) {
            Ok(existing) if existing.is_set() => existing,
            _ => generate(),
        }
    };
    write_private(&path(state_dir), token.expose().as_bytes())?;
    Ok(token)
}

/// The token of the lab in `state_dir`.
pub fn read(state_dir: &Path) -> std::io::Result<AdminToken> {
    let text = std::fs::read_to_string(path(state_dir))?;
    Ok(AdminToken::new(text.trim()))
}

/// 32 random hex digits (128 bits).
fn generate() -> AdminToken {
    AdminToken::new(random_hex())
}

/// 32 random hex digits (128 bits): safe in a URL and in SQL quotes.
fn random_hex() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The password of the lab's MySQL user `lab` in `state_dir`
/// (`<state-dir>/mysql.password`, owner only): the one already there, else
/// a new random one. Each native lab has its own, so a password found in a
/// log would be this lab's, and a test can search for it.
pub fn ensure_mysql_password(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("mysql.password");
    if let Ok(existing) = std::fs::read_to_string(&path)
        && !existing.trim().is_empty()
    {
        return Ok(existing.trim().to_owned());
    }
    let password = random_hex();
    write_private(&path, password.as_bytes())?;
    Ok(password)
}

/// Writes `contents` to `path`, mode 0600 (the file is replaced, so an old
/// copy with wider permissions does not keep them).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_lab_gets_a_private_random_mysql_password_and_keeps_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ensure_mysql_password(dir.path()).expect("ensure");
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first}");
        let mode = std::fs::metadata(dir.path().join("mysql.password"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ensure_mysql_password(dir.path()).expect("again"), first);
        let other = tempfile::tempdir().expect("temp dir");
        assert_ne!(ensure_mysql_password(other.path()).expect("other"), first);
    }

    #[test]
    fn a_new_lab_gets_a_private_random_token_and_keeps_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ensure(dir.path(), &AdminToken::default()).expect("ensure");
        assert_eq!(first.expose().len(), 32);
        let mode = std::fs::metadata(path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ensure(dir.path(), &AdminToken::default()).expect("ensure again");
        assert_eq!(again, first);
        assert_eq!(read(dir.path()).expect("read"), first);
    }

    #[test]
    fn a_configured_token_wins_and_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        ensure(dir.path(), &AdminToken::default()).expect("ensure");
        let configured = AdminToken::new("configured-token-0123456789");
        assert_eq!(ensure(dir.path(), &configured).expect("ensure"), configured);
        assert_eq!(read(dir.path()).expect("read"), configured);
    }
}
