//! The agent's rustls configurations: TLS 1.3 only, the ring provider,
//! and verifiers that check, on both sides, that the peer's chain leads
//! to a `--ca` trust anchor (webpki: signatures, validity dates, key
//! usage) and that its leaf's SPIFFE ID (the URI SAN) is exactly the
//! identity of the auth key being proven, and not revoked.
//!
//! There is no DNS name to check: the server name rustls requires is a
//! placeholder, the SPIFFE ID check replaces it.

use std::sync::Arc;

use meshpath::policy::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::auth_certs::cert_facts;
use crate::auth_files::Revoked;

/// The crypto provider: ring (builds with a C compiler alone).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server name a client sends: a placeholder (the verifiers check
/// SPIFFE IDs, not names).
pub(crate) fn placeholder_name() -> ServerName<'static> {
    ServerName::try_from("meshpath-auth.invalid")
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()))
}

/// What a verifier demands of the peer's leaf certificate.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    /// "client" or "server", for messages.
    pub(crate) role: &'static str,
    /// The SPIFFE ID it must carry; `None`: any (revocation notices,
    /// which can only remove entries).
    pub(crate) spiffe: Option<SpiffeId>,
    /// Serials and identities refused; `None`: not checked.
    pub(crate) revoked: Option<Arc<Revoked>>,
}

#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(msg)))))
}

/// The SPIFFE and revocation checks of `expect` on a leaf whose chain
/// has been verified.
fn check_leaf(der: &CertificateDer<'_>, expect: &Expect) -> Result<(), rustls::Error> {
    let role = expect.role;
    let facts = cert_facts(der).map_err(|e| refuse(format!("the {role} certificate: {e}")))?;
    let id = facts
        .spiffe_id()
        .map_err(|e| refuse(format!("the {role} certificate {e}")))?;
    if let Some(want) = &expect.spiffe {
        if id != want {
            return Err(refuse(format!(
                "the {role} certificate names {id}, expected {want}"
            )));
        }
    }
    if let Some(revoked) = &expect.revoked {
        if let Some(why) = revoked.why(&facts.serial, Some(id)) {
            return Err(refuse(format!("the {role} certificate of {id}: {why}")));
        }
    }
    Ok(())
}

/// The client's check of the server: chain to `--ca`, then SPIFFE ID.
#[derive(Debug)]
struct ServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expect: Expect,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_leaf(end_entity, &self.expect)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The server's check of the client: webpki's client verifier (chain to
/// `--ca`, mandatory), then SPIFFE ID.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expect: Expect,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_leaf(end_entity, &self.expect)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client presenting `key`, demanding `expect` of the server.
pub(crate) fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    key: &Arc<CertifiedKey>,
    expect: Expect,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = ServerVerifier {
        roots: roots.clone(),
        algs: provider.signature_verification_algorithms,
        expect,
    };
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone()))))
}

/// A server presenting `key`, demanding a client certificate that meets
/// `expect`.
pub(crate) fn server_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    key: &Arc<CertifiedKey>,
    expect: Expect,
) -> Result<ServerConfig, rustls::Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let verifier = ClientVerifier { inner, expect };
    Ok(ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone()))))
}
