//! TLS to PostgreSQL with rustls, the way libpq does it.
//!
//! What each `sslmode` checks (<https://www.postgresql.org/docs/current/libpq-ssl.html>):
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | | |
//! | `allow` | only if the server refuses plain | if `sslrootcert` is given | |
//! | `prefer` (default) | if the server offers it | if `sslrootcert` is given | |
//! | `require` | always | if `sslrootcert` is given | |
//! | `verify-ca` | always | always | |
//! | `verify-full` | always | always | always |
//!
//! As in libpq, a root certificate makes even `require` check the chain, and
//! `sslrootcert=system` (the OS trust store) insists on `verify-full`.
//!
//! Two ways in: [`MakeRustls`] for tokio-postgres, and [`negotiate`] for the
//! hand-written replication connection (SSLRequest, then TLS on the same socket).
//! Both expose the `tls-server-end-point` hash of the server certificate
//! (RFC 5929), which SCRAM-SHA-256-PLUS binds the authentication to.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::dsn::TlsKeys;
use super::ConnectError;

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, ConnectError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnectError::settings(format!(
                    "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Modes that fail rather than fall back to clear text.
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// Nothing given: no chain check (unless the mode is verify-*, which then
    /// falls back to libpq's `~/.postgresql/root.crt`).
    None,
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's store.
    System,
}

/// The TLS half of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root: RootCert,
    /// Client certificate and key (PEM), for `cert` authentication.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Send the host name in the handshake (SNI); libpq's `sslsni`, on by default.
    pub sni: bool,
}

impl TlsSettings {
    pub fn from_keys(keys: &TlsKeys) -> Result<TlsSettings, ConnectError> {
        let root = match keys.sslrootcert.as_deref() {
            None | Some("") => RootCert::None,
            Some("system") => RootCert::System,
            Some(path) => RootCert::File(PathBuf::from(path)),
        };
        let mode = match keys.sslmode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            // libpq 16: the system store implies verify-full, a public CA
            // vouching for a name being the whole point.
            None if root == RootCert::System => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root == RootCert::System && mode != SslMode::VerifyFull {
            return Err(ConnectError::settings(format!(
                "sslrootcert=system needs sslmode=verify-full (got {}): any certificate from a public CA would pass otherwise",
                mode.as_str()
            )));
        }
        if keys.sslpassword.is_some() {
            return Err(ConnectError::settings(
                "sslpassword: encrypted client keys are not supported; store the key unencrypted with mode 0600 \
                 (openssl pkey -in client.key -out client-plain.key) and point sslkey at it"
                    .into(),
            ));
        }
        let client = match (&keys.sslcert, &keys.sslkey) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            _ => return Err(ConnectError::settings("set both sslcert and sslkey, or neither".into())),
        };
        let sni = match keys.sslsni.as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(ConnectError::settings(format!("sslsni={other:?}: use 0 or 1"))),
        };
        Ok(TlsSettings { mode, root, client, sni })
    }

    /// The rustls configuration these settings call for. Built per connection
    /// on purpose: a rotated CA bundle or client certificate is picked up by the
    /// next reconnect, and connections are rare enough for the file reads.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let level = match (&self.root, self.mode) {
            (_, SslMode::VerifyFull) => Check::Full,
            (_, SslMode::VerifyCa) | (RootCert::File(_) | RootCert::System, _) => Check::Chain,
            (RootCert::None, _) => Check::Nothing,
        };
        let webpki = match level {
            Check::Nothing => None,
            Check::Chain | Check::Full => {
                let roots = self.roots()?;
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| ConnectError::settings(format!("sslrootcert: {e}")))?,
                )
            }
        };
        let verifier = Arc::new(Verifier { level, webpki, provider: provider.clone() });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::settings(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    ConnectError::settings(format!("sslkey {}: {e} (a PEM private key is expected)", key.display()))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConnectError::settings(format!("sslcert/sslkey: {e}")))?
            }
        };
        // What libpq 17 sends; older servers ignore it, newer ones require it
        // for direct TLS negotiation.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        config.enable_sni = self.sni;
        Ok(Arc::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, ConnectError> {
        let mut roots = RootCertStore::empty();
        match &self.root {
            RootCert::File(path) => {
                for cert in read_certs(path, "sslrootcert")? {
                    roots
                        .add(cert)
                        .map_err(|e| ConnectError::settings(format!("sslrootcert {}: {e}", path.display())))?;
                }
            }
            RootCert::System => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(ConnectError::settings(
                        "sslrootcert=system: the operating system's trust store is empty or unreadable \
                         (install ca-certificates, or point sslrootcert at your provider's CA bundle)"
                            .into(),
                    ));
                }
            }
            RootCert::None => {
                // libpq's default location, then a message naming the key to set.
                let default = std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"));
                match default.filter(|p| p.is_file()) {
                    Some(path) => {
                        for cert in read_certs(&path, "sslrootcert")? {
                            roots.add(cert).map_err(|e| ConnectError::settings(format!("{}: {e}", path.display())))?;
                        }
                    }
                    None => {
                        return Err(ConnectError::settings(format!(
                            "sslmode={} checks the server certificate, but no CA is given: add \
                             sslrootcert=/path/to/ca.pem (your provider's CA bundle, see docs/managed-postgres.md) \
                             or sslrootcert=system to the connection string",
                            self.mode.as_str()
                        )))
                    }
                }
            }
        }
        Ok(roots)
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConnectError::settings(format!("{key} {}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| ConnectError::settings(format!("{key} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConnectError::settings(format!("{key} {}: no PEM certificate in the file", path.display())));
    }
    Ok(certs)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// `require` and weaker without a root certificate: encryption, no authentication of the server.
    Nothing,
    /// `verify-ca`: signed by a trusted root, whatever name it carries.
    Chain,
    /// `verify-full`: and the name matches the host connected to.
    Full,
}

/// rustls' WebPKI verifier, with the two relaxations libpq's modes call for.
#[derive(Debug)]
struct Verifier {
    level: Check,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // WebPKI checks the chain before the name, so a name error means the chain passed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.level == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    // The handshake signatures are checked at every level: without that, even
    // "no verification" would not prove the peer holds the certificate's key,
    // and the channel binding hash would bind to nothing.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A handshake failure, kept as the I/O error tokio-rustls returns (the rustls
/// error inside says what the certificate lacked).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake: {0}")]
pub struct HandshakeError(#[from] pub io::Error);

impl HandshakeError {
    /// The certificate problem, when that is what failed.
    pub fn certificate(&self) -> Option<&CertificateError> {
        match self.0.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the handshake itself was refused (bad certificate, no common
    /// protocol): the same again fails the same way. I/O trouble is retryable.
    pub fn is_permanent(&self) -> bool {
        self.0.get_ref().is_some_and(|e| e.is::<rustls::Error>())
    }
}

/// `tls-server-end-point` (RFC 5929 §4.1): the server certificate hashed with
/// the hash of its signature algorithm, SHA-256 standing in for MD5 and SHA-1.
/// None for algorithms without one (Ed25519, RSA-PSS): no channel binding then,
/// as PostgreSQL itself cannot compute it either.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const SHA256: [&[u8]; 4] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
    ];
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = signature_algorithm(cert)?;
    if SHA256.contains(&oid) {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if SHA384.contains(&oid) {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if SHA512.contains(&oid) {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// The OID of `Certificate.signatureAlgorithm` (RFC 5280 §4.1): the outer
/// SEQUENCE holds tbsCertificate, then an AlgorithmIdentifier SEQUENCE whose
/// first element is the OID. Just enough DER to get there.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    /// (tag, content, rest) of the TLV at the start of `b`.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |acc, &x| (acc << 8) | x as usize);
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, _tbs, rest) = tlv(cert)? else { return None };
    let (0x30, alg, _) = tlv(rest)? else { return None };
    let (0x06, oid, _) = tlv(alg)? else { return None };
    Some(oid)
}

/// A rustls connector for tokio-postgres.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    pub fn new(config: Arc<rustls::ClientConfig>) -> MakeRustls {
        MakeRustls { config }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, HandshakeError> {
        let name = server_name(domain)?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, HandshakeError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| HandshakeError(io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?} for TLS: {e}"))))
}

pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS session over `S`.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> RustlsStream<S> {
    /// The `tls-server-end-point` data, when the certificate's algorithm has one.
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        let (_, session) = self.0.get_ref();
        session.peer_certificates()?.first().and_then(|c| server_end_point(c))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.server_end_point() {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

/// What [`negotiate`] ends with.
pub enum Negotiated<S> {
    Plain(S),
    /// Boxed: the session state is a kilobyte, and the value is boxed soon anyway.
    Tls(Box<RustlsStream<S>>),
}

/// SSLRequest on a fresh socket, then the handshake if the server agrees
/// (<https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>);
/// with `direct` (libpq's `sslnegotiation=direct`, PostgreSQL 17+), the
/// handshake at once, ALPN `postgresql` saying what follows.
/// `host` is the name the certificate must carry (verify-full) and the SNI.
/// `disable` and `allow` send nothing: the caller retries `allow` with TLS
/// (`force_tls`) if the server turns clear text away.
pub async fn negotiate<S>(
    mut socket: S,
    settings: &TlsSettings,
    host: &str,
    force_tls: bool,
    direct: bool,
) -> Result<Negotiated<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !force_tls && matches!(settings.mode, SslMode::Disable | SslMode::Allow) {
        return Ok(Negotiated::Plain(socket));
    }
    let config = settings.client_config()?;
    if direct {
        if !settings.mode.requires_tls() && !force_tls {
            // As libpq: nothing to fall back to once the handshake has started.
            return Err(ConnectError::settings(format!(
                "sslnegotiation=direct needs sslmode=require or stronger (got {})",
                settings.mode.as_str()
            )));
        }
        return handshake(socket, config, settings, host).await;
    }
    // Length 8, then the SSLRequest code 1234.5679.
    let request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let io = |e: io::Error| ConnectError::io(host, e);
    socket.write_all(&request).await.map_err(io)?;
    socket.flush().await.map_err(io)?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {}
        b'N' if settings.mode.requires_tls() || force_tls => return Err(ConnectError::no_tls_on_server()),
        b'N' => return Ok(Negotiated::Plain(socket)),
        other => {
            return Err(ConnectError::settings(format!(
                "unexpected answer {:?} to the TLS request: is this a PostgreSQL server?",
                other as char
            )))
        }
    }
    handshake(socket, config, settings, host).await
}

async fn handshake<S>(
    socket: S,
    config: Arc<rustls::ClientConfig>,
    settings: &TlsSettings,
    host: &str,
) -> Result<Negotiated<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let name = server_name(host).map_err(|e| ConnectError::handshake(&e, settings))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, socket)
        .await
        .map_err(|e| ConnectError::handshake(&HandshakeError(e), settings))?;
    Ok(Negotiated::Tls(Box::new(RustlsStream(tls))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> TlsKeys {
        let mut k = TlsKeys::default();
        for (key, v) in pairs {
            let v = Some(v.to_string());
            match *key {
                "sslmode" => k.sslmode = v,
                "sslrootcert" => k.sslrootcert = v,
                "sslcert" => k.sslcert = v,
                "sslkey" => k.sslkey = v,
                "sslpassword" => k.sslpassword = v,
                _ => unreachable!(),
            }
        }
        k
    }

    #[test]
    fn modes_follow_libpq() {
        assert_eq!(TlsSettings::from_keys(&keys(&[])).unwrap().mode, SslMode::Prefer);
        assert_eq!(TlsSettings::from_keys(&keys(&[("sslrootcert", "system")])).unwrap().mode, SslMode::VerifyFull);
        let err = TlsSettings::from_keys(&keys(&[("sslrootcert", "system"), ("sslmode", "require")])).unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
        assert!(TlsSettings::from_keys(&keys(&[("sslmode", "verify_full")])).is_err());
        assert!(TlsSettings::from_keys(&keys(&[("sslcert", "/c")])).is_err());
        let mut no_sni = keys(&[("sslmode", "require")]);
        no_sni.sslsni = Some("0".into());
        let settings = TlsSettings::from_keys(&no_sni).unwrap();
        assert!(!settings.sni && !settings.client_config().unwrap().enable_sni);
        assert!(TlsSettings::from_keys(&keys(&[])).unwrap().client_config().unwrap().enable_sni);
        let err = TlsSettings::from_keys(&keys(&[("sslpassword", "hunter2")])).unwrap_err().to_string();
        assert!(!err.contains("hunter2") && err.contains("sslkey"), "{err}");
    }

    #[test]
    fn verify_without_a_ca_names_the_key_to_set() {
        let libpq_default = std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"));
        if !libpq_default.is_some_and(|p| p.exists()) {
            let s = TlsSettings::from_keys(&keys(&[("sslmode", "verify-full")])).unwrap();
            let err = s.client_config().unwrap_err().to_string();
            assert!(err.contains("sslrootcert=/path/to/ca.pem"), "{err}");
        }
        let s = TlsSettings::from_keys(&keys(&[("sslmode", "require"), ("sslrootcert", "/no/such/ca.pem")])).unwrap();
        let err = s.client_config().unwrap_err().to_string();
        assert!(err.contains("/no/such/ca.pem"), "{err}");
    }

    /// What the server side sees first: an SSLRequest, or (direct) a TLS
    /// ClientHello offering ALPN "postgresql".
    async fn first_bytes(settings: TlsSettings, direct: bool) -> (Vec<u8>, Result<(), String>) {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut buf = vec![0u8; 8];
            if server.read_exact(&mut buf).await.is_err() {
                return Vec::new(); // the client gave up before sending anything
            }
            if buf == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
                server.write_all(b"N").await.unwrap();
            } else {
                let mut more = vec![0u8; 512];
                let n = server.read(&mut more).await.unwrap();
                buf.extend_from_slice(&more[..n]);
            }
            // Dropping the server ends a handshake that would wait for an answer.
            buf
        };
        let client_side = negotiate(client, &settings, "db.example.com", false, direct);
        let (result, seen) = tokio::join!(client_side, server_side);
        (seen, result.map(|_| ()).map_err(|e| e.to_string()))
    }

    #[tokio::test]
    async fn sslrequest_or_direct_handshake() {
        let require = TlsSettings::from_keys(&keys(&[("sslmode", "require")])).unwrap();
        let (seen, result) = first_bytes(require.clone(), false).await;
        assert_eq!(seen, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert!(result.unwrap_err().contains("does not accept TLS"));

        let prefer = TlsSettings::from_keys(&keys(&[])).unwrap();
        let (_, result) = first_bytes(prefer.clone(), false).await;
        assert!(result.is_ok(), "prefer goes on in clear text after 'N'");

        let (seen, _) = first_bytes(require, true).await;
        assert_eq!(seen[0], 0x16, "a TLS record (handshake) straight away");
        assert!(seen.windows(10).any(|w| w == b"postgresql"), "ALPN postgresql offered");

        let (_, result) = first_bytes(prefer, true).await;
        assert!(result.unwrap_err().contains("sslnegotiation=direct needs sslmode=require"));
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        let hash = server_end_point(cert.der()).unwrap();
        assert_eq!(hash, sha2::Sha384::digest(cert.der()).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(server_end_point(cert.der()).unwrap(), sha2::Sha256::digest(cert.der()).to_vec());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(server_end_point(cert.der()), None);
        assert_eq!(server_end_point(b"\x30\x03\x02\x01"), None);
    }
}
