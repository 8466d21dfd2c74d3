//! Credentials: the bearer token sent with every request, and the TLS
//! settings of the connection.

use std::fmt;
use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::{Error, Result};

/// An interceptor that adds `authorization: Bearer <token>` to every request
/// (unary calls and Watch streams alike); without a token it adds nothing.
///
/// [`Client`](crate::Client) uses it on its own; it is public for calls made
/// through [`Client::authorized_stub`](crate::Client::authorized_stub) or a
/// stub of one's own:
/// `CoordinatorClient::with_interceptor(channel, BearerToken::new(token)?)`.
///
/// Its `Debug` output never shows the token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The interceptor for `token`. Fails with [`Error::InvalidSetting`] when
    /// the token is empty or cannot be sent in a header (visible ASCII only).
    pub fn new(token: &str) -> Result<Self> {
        let invalid = |message: &str| Error::InvalidSetting {
            setting: "token".into(),
            message: message.into(),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(invalid("the token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "the token must be visible ASCII without spaces (as `freshd --new-token` prints it)",
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| invalid("the token cannot be sent in a header"))?;
        // Kept out of HTTP/2 header compression tables.
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// No token: requests go out as they are.
    pub fn none() -> Self {
        BearerToken(None)
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.is_set() { "<redacted>" } else { "none" };
        f.debug_tuple("BearerToken").field(&shown).finish()
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A token as given to the builder; never printed.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// PEM given in memory or as a file read at connect time.
#[derive(Clone)]
pub(crate) enum Pem {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Pem {
    fn read(&self, setting: &str) -> Result<Vec<u8>> {
        match self {
            Pem::Bytes(b) => Ok(b.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|e| Error::InvalidSetting {
                setting: setting.into(),
                message: format!("cannot read {}: {e}", path.display()),
            }),
        }
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::Bytes(b) => write!(f, "<{} bytes of PEM>", b.len()),
            Pem::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The TLS settings of a [`crate::ClientBuilder`].
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSettings {
    pub(crate) ca: Vec<Pem>,
    pub(crate) identity: Option<(Pem, Pem)>,
    pub(crate) domain: Option<String>,
}

impl TlsSettings {
    /// Whether anything was set.
    pub(crate) fn is_set(&self) -> bool {
        !self.ca.is_empty() || self.identity.is_some() || self.domain.is_some()
    }

    /// The tonic configuration: the CAs given, else the system's roots (with
    /// the `native-roots` feature).
    pub(crate) fn config(&self) -> Result<ClientTlsConfig> {
        let mut config = ClientTlsConfig::new();
        if self.ca.is_empty() {
            config = config.with_enabled_roots();
        }
        for ca in &self.ca {
            let pem = ca.read("tls_ca")?;
            if !contains_pem(&pem, "CERTIFICATE") {
                return Err(Error::InvalidSetting {
                    setting: "tls_ca".into(),
                    message: format!("{ca:?} holds no PEM certificate"),
                });
            }
            config = config.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &self.identity {
            let cert_pem = cert.read("tls_cert")?;
            let key_pem = key.read("tls_key")?;
            if !contains_pem(&cert_pem, "CERTIFICATE") {
                return Err(Error::InvalidSetting {
                    setting: "tls_cert".into(),
                    message: format!("{cert:?} holds no PEM certificate"),
                });
            }
            if !contains_pem(&key_pem, "PRIVATE KEY") {
                return Err(Error::InvalidSetting {
                    setting: "tls_key".into(),
                    message: format!("{key:?} holds no PEM private key"),
                });
            }
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// Whether `pem` has a `-----BEGIN ...<label>-----` line (`PRIVATE KEY`
/// matches PKCS#8, `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
fn contains_pem(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem)
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_token_goes_into_authorization_and_never_into_debug() {
        let mut token = BearerToken::new("fd_secret").unwrap();
        let request = token.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer fd_secret"
        );
        assert!(!format!("{token:?}").contains("fd_secret"));
        assert!(!format!("{:?}", Secret("fd_secret".into())).contains("fd_secret"));
        let request = BearerToken::none().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn unusable_tokens_are_refused() {
        for bad in ["", "  ", "two words", "caf\u{e9}", "a\nb"] {
            let e = BearerToken::new(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidSetting { .. }), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn pem_labels_are_recognised() {
        assert!(contains_pem(
            b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
            "CERTIFICATE"
        ));
        assert!(contains_pem(
            b"-----BEGIN EC PRIVATE KEY-----\n",
            "PRIVATE KEY"
        ));
        assert!(!contains_pem(b"not pem", "CERTIFICATE"));
    }
}
