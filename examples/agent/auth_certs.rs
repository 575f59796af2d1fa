//! Certificates for the agent's mutual-TLS handshakes: reading PEM files
//! (`--cert`, `--key`, `--ca`), the SPIFFE ID a certificate proves (its URI
//! SAN), serials, and the lifetime of an auth entry.
//!
//! Pure: no datapath, no sockets; `tests/agent_auth.rs` includes this file
//! with `#[path]` to test it without root. Errors name the flag and file.
//! Files are read through `files` (bounded, regular files only), which
//! lives here so that the test gets it too; the agent uses it as
//! `crate::files`.

#[path = "files.rs"]
pub(crate) mod files;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use meshpath::policy::{Identity, IdentityKey, SpiffeId};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What the agent needs to know of one X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFacts {
    /// The SPIFFE ID of its URI SAN, when it has exactly one.
    pub(crate) spiffe: Result<SpiffeId, String>,
    /// Serial number, big-endian, without leading zero bytes (at least
    /// one byte).
    pub(crate) serial: Vec<u8>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

impl CertFacts {
    /// The SPIFFE ID, or why there is none.
    pub(crate) fn spiffe_id(&self) -> Result<&SpiffeId, String> {
        self.spiffe.as_ref().map_err(Clone::clone)
    }
}

/// Parses a DER certificate. The SPIFFE ID is the certificate's one URI
/// SAN starting with `spiffe://` (X.509-SVID); none, several, or one that
/// is not a valid SPIFFE ID is an error kept in `spiffe`.
pub(crate) fn cert_facts(der: &[u8]) -> Result<CertFacts, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let time = |t: &x509_parser::time::ASN1Time| {
        let s = t.timestamp();
        if s >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(s as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let spiffe = match cert.subject_alternative_name() {
        Err(e) => Err(format!("its subjectAltName does not parse: {e}")),
        Ok(None) => Err("has no subjectAltName: a SPIFFE ID is a URI SAN spiffe://...".into()),
        Ok(Some(san)) => {
            let uris: Vec<&str> = san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .filter(|u| u.starts_with("spiffe://"))
                .collect();
            match uris.as_slice() {
                [] => Err("has no SPIFFE ID (a URI SAN spiffe://...)".into()),
                [one] => one
                    .parse::<SpiffeId>()
                    .map_err(|e| format!("its URI SAN is not a valid SPIFFE ID: {e}")),
                many => Err(format!(
                    "has {} SPIFFE IDs ({}); an X.509-SVID has exactly one",
                    many.len(),
                    many.join(", ")
                )),
            }
        }
    };
    Ok(CertFacts {
        spiffe,
        serial: normalize_serial(cert.raw_serial()),
        not_before: time(&cert.validity().not_before),
        not_after: time(&cert.validity().not_after),
    })
}

/// A serial without leading zero bytes (DER adds one to keep it
/// positive), at least one byte.
pub(crate) fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].to_vec()
}

/// A serial as colon-separated hex (`01:a3:ff`), as `openssl x509
/// -serial` shows it without colons; the revoked file takes either.
pub(crate) fn serial_hex(serial: &[u8]) -> String {
    serial
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A local identity's credentials: a certificate chain, its key, and what
/// its leaf says.
#[derive(Debug)]
pub(crate) struct LocalCert {
    pub(crate) spiffe: SpiffeId,
    /// The identity number of `spiffe` (under the cluster's key).
    pub(crate) identity: u64,
    pub(crate) facts: CertFacts,
    /// The chain as presented (leaf first) with its signing key.
    pub(crate) key: Arc<CertifiedKey>,
    /// The earliest not-after of the chain it presents.
    pub(crate) chain_not_after: SystemTime,
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    files::read_file(flag, path, files::SMALL_LIMIT)
        .with_context(|| format!("{flag} {}", path.display()))
}

/// Every PEM certificate in `bytes` (other PEM sections are skipped).
fn pem_certs(
    flag: &str,
    path: &Path,
    bytes: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(bytes) {
        out.push(c.map_err(|e| anyhow!("{flag} {}: not valid PEM: {e}", path.display()))?);
    }
    if out.is_empty() {
        bail!(
            "{flag} {}: holds no certificate (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        );
    }
    Ok(out)
}

/// Reads one `--cert CERT --key KEY` pair: the certificate chain (leaf
/// first), a private key that matches the leaf, and the leaf's SPIFFE ID.
pub(crate) fn load_local_cert(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
    identity_key: &IdentityKey,
) -> anyhow::Result<LocalCert> {
    let chain = pem_certs("--cert", cert_path, &read("--cert", cert_path)?)?;
    let shown = cert_path.display();
    let mut facts = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        facts.push(
            cert_facts(der)
                .map_err(|e| anyhow!("--cert {shown}: certificate {} of the file: {e}", i + 1))?,
        );
    }
    let leaf = facts[0].clone();
    let spiffe = leaf
        .spiffe_id()
        .map_err(|e| anyhow!("--cert {shown}: {e}"))?
        .clone();
    let key_bytes = read("--key", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        anyhow!(
            "--key {}: holds no private key (expected PEM PRIVATE KEY): {e}",
            key_path.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => anyhow!(
            "--key {}: does not match the certificate of --cert {shown}",
            key_path.display()
        ),
        other => anyhow!("--key {}: unusable: {other}", key_path.display()),
    })?;
    let chain_not_after = facts
        .iter()
        .map(|f| f.not_after)
        .min()
        .unwrap_or(leaf.not_after);
    Ok(LocalCert {
        identity: Identity::Workload(spiffe.clone()).number(identity_key),
        spiffe,
        facts: leaf,
        key: Arc::new(certified),
        chain_not_after,
    })
}

/// Reads `--ca`: a PEM bundle of trust anchors. How many it holds.
pub(crate) fn load_ca(path: &Path) -> anyhow::Result<RootCertStore> {
    let certs = pem_certs("--ca", path, &read("--ca", path)?)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            anyhow!(
                "--ca {}: certificate {} is not a usable trust anchor: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(roots)
}

/// Until when an auth entry holds: the earliest of the certificates'
/// not-after times, capped at `now + ttl`.
pub(crate) fn entry_until(
    now: SystemTime,
    ttl: Duration,
    not_afters: impl IntoIterator<Item = SystemTime>,
) -> SystemTime {
    not_afters
        .into_iter()
        .fold(now + ttl, |until, t| until.min(t))
}

/// When to renew an entry valid from `from` until `until`: `before` ahead
/// of its expiry, but at most a third of its lifetime ahead (a short TTL
/// is not renewed in a loop). `None` when `before` is zero (renewal off).
pub(crate) fn renew_at(
    from: SystemTime,
    until: SystemTime,
    before: Duration,
) -> Option<SystemTime> {
    if before.is_zero() {
        return None;
    }
    let life = until.duration_since(from).unwrap_or_default();
    Some(until - before.min(life / 3))
}

/// A time as `2026-11-22T10:00:00Z` (UTC), for log lines.
pub(crate) fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
