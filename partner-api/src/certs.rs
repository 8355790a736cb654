//! The lab's private PKI: one CA and one server certificate for the partner.
//!
//! B has to trust the partner the way a real client trusts a real partner —
//! through a CA it was given, not by skipping verification — so that a
//! per-call TLS setup (cause 4) costs what it costs in production. Only the
//! CA's certificate leaves this module; its private key is never written.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA certificate B trusts (`partner.ca_cert`).
pub const CA_FILE: &str = "ca.pem";
/// The partner's leaf certificate (`partner.cert`).
pub const CERT_FILE: &str = "partner.pem";
/// The leaf's private key (`partner.key`), mode 0600.
pub const KEY_FILE: &str = "partner.key";

const CA_NAME: &str = "grpc-incident-lab CA";

/// Where [`ensure`] put the PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The file names [`ensure`] uses inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    fn all_exist(&self) -> bool {
        [&self.ca_cert, &self.cert, &self.key]
            .iter()
            .all(|p| p.is_file())
    }
}

/// Makes a CA and a server certificate for `hosts` in `dir`, or reuses the
/// ones already there: a restarted lab keeps trusting the same CA, so a B
/// started earlier (or a CA copied elsewhere) stays valid.
///
/// The existing files are reused as they are, whatever hosts they were made
/// for; delete the directory to make new ones.
pub fn ensure(dir: &Path, hosts: &[&str]) -> anyhow::Result<TlsFiles> {
    let files = TlsFiles::in_dir(dir);
    if files.all_exist() {
        return Ok(files);
    }
    let Some(first_host) = hosts.first() else {
        bail!("the partner certificate needs at least one host name or IP address");
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = common_name(CA_NAME);
    // Path length 0: this CA signs leaves only, never another CA.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // rcgen's default validity (1975 to 4096) is kept on purpose: the CA is
    // reused across restarts and must not expire under a running lab.
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().context("generating the partner key")?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = common_name(first_host);
    leaf.subject_alt_names = hosts
        .iter()
        .map(|h| san(h))
        .collect::<anyhow::Result<_>>()?;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .context("signing the partner certificate")?;

    // The CA goes last: until all three files exist, the next call makes a
    // fresh set instead of reusing half of one.
    write_atomically(&files.key, leaf_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&files.cert, leaf_cert.pem().as_bytes(), 0o644)?;
    write_atomically(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// An IP SAN for an address, a DNS SAN otherwise: clients match an IP in
/// the URL only against IP SANs.
fn san(host: &str) -> anyhow::Result<SanType> {
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            host.try_into()
                .with_context(|| format!("{host:?} is not a valid DNS name"))?,
        ),
    })
}

/// Temp file + rename, so a reader (or a crash) never sees half a file; the
/// mode is set at creation so the key is never readable by others.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, sync::Arc};

    use rustls::{
        RootCertStore,
        client::{WebPkiServerVerifier, danger::ServerCertVerifier},
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    };

    use super::*;

    /// A verifier that trusts only the CA in `ca_pem`, as B's client does.
    fn verifier(ca_pem: &Path) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).expect("open CA") {
            roots.add(cert.expect("CA PEM")).expect("CA accepted");
        }
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier")
    }

    fn verify(verifier: &WebPkiServerVerifier, leaf: &Path, host: &str) -> Result<(), String> {
        let leaf = CertificateDer::from_pem_file(leaf).expect("leaf PEM");
        let name = ServerName::try_from(host.to_string()).expect("server name");
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_leaf_is_trusted_through_its_ca_and_only_for_its_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ensure(dir.path(), &["127.0.0.1", "localhost"]).expect("certs");
        let trusting = verifier(&files.ca_cert);
        verify(&trusting, &files.cert, "127.0.0.1").expect("IP SAN accepted");
        verify(&trusting, &files.cert, "localhost").expect("DNS SAN accepted");
        let wrong_host = verify(&trusting, &files.cert, "partner.example");
        assert!(wrong_host.is_err(), "a host not in the SANs is refused");

        let other = tempfile::tempdir().expect("tempdir");
        let other_files = ensure(other.path(), &["127.0.0.1"]).expect("other certs");
        // Both CAs share a name, so webpki finds the other one and fails on
        // the signature (BadSignature) rather than on the name.
        verify(&verifier(&other_files.ca_cert), &files.cert, "127.0.0.1")
            .expect_err("a different CA must not vouch for the leaf");
    }

    #[test]
    fn files_are_reused_and_the_key_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ensure(dir.path(), &["127.0.0.1"]).expect("certs");
        let read =
            |f: &TlsFiles| [&f.ca_cert, &f.cert, &f.key].map(|p| fs::read(p).expect("read back"));
        let before = read(&first);
        let second = ensure(dir.path(), &["127.0.0.1"]).expect("again");
        assert_eq!(first, second);
        assert_eq!(before, read(&second), "an existing set is kept as is");
        let mode = fs::metadata(&first.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A half-written set is replaced by a whole new one.
        fs::remove_file(&first.cert).expect("remove");
        ensure(dir.path(), &["127.0.0.1"]).expect("regenerated");
        assert_ne!(before[0], fs::read(&first.ca_cert).expect("new CA"));
    }

    #[test]
    fn hosts_are_required_and_must_be_names_or_ips() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ensure(dir.path(), &[]).is_err());
        let err = ensure(dir.path(), &["bad host\u{e9}"]).expect_err("rejected");
        assert!(format!("{err:#}").contains("bad host"), "{err:#}");
    }
}
