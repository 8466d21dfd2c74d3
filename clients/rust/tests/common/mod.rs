//! Real servers in-process for the tests; they stop on drop.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use freshd::config::Config;
use freshd::server::RunningServer;
use freshd_client::Client;

/// A server on an ephemeral loopback port, without admin HTTP, that drains
/// quickly; ready when this returns.
pub async fn start() -> RunningServer {
    start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// The same on `addr` (retrying while the port is still being released).
pub async fn start_on(addr: SocketAddr) -> RunningServer {
    let mut config = Config::ephemeral();
    config.listen = addr;
    config.admin_listen = None;
    config.shutdown_grace = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let server = loop {
        match RunningServer::start(config.clone()).await {
            Ok(server) => break server,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the server does not start on {addr}: {e}"),
        }
    };
    let client = Client::connect(server.url()).await.expect("connects");
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.stats().await.is_ok()
        })
        .await,
        "the server is not serving after 10 s"
    );
    server
}

/// Retries `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Principals, tokens and certificates for the security tests.
pub mod security {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    use freshd::auth::{
        hash_token, parse_sha256, AuthConfig, PrincipalConfig, Quotas, Scope, Scopes,
    };
    use freshd::config::Config;
    use freshd::server::RunningServer;
    use freshd::tls::TlsConfig;

    /// Each test principal's token, derived from its name.
    pub fn token_of(name: &str) -> String {
        format!("fd_client_test_token_of_{name}")
    }

    /// A principal holding `scopes` per namespace.
    pub fn principal(name: &str, scopes: &[(&str, &[Scope])], quotas: Quotas) -> PrincipalConfig {
        PrincipalConfig {
            name: name.into(),
            token_sha256: parse_sha256(&hash_token(&token_of(name))).unwrap(),
            expires: None,
            scopes: scopes
                .iter()
                .map(|(ns, list)| {
                    let mut set = Scopes::default();
                    for s in *list {
                        set.insert(*s);
                    }
                    (ns.to_string(), set)
                })
                .collect(),
            quotas,
        }
    }

    /// `admin` may do everything; `feed` may check, watch and fill in
    /// `feed` and check everywhere.
    pub fn principals() -> Vec<PrincipalConfig> {
        vec![
            principal("admin", &[("*", &Scope::ALL)], Quotas::default()),
            principal(
                "feed",
                &[
                    ("feed", &[Scope::Check, Scope::Watch, Scope::Fill]),
                    ("*", &[Scope::Check]),
                ],
                Quotas::default(),
            ),
        ]
    }

    /// Starts a server with `principals` and, when given, TLS.
    pub async fn start(principals: Vec<PrincipalConfig>, tls: Option<TlsConfig>) -> RunningServer {
        let mut config = Config::ephemeral();
        config.admin_listen = None;
        config.shutdown_grace = Duration::from_secs(2);
        config.auth = AuthConfig {
            principals,
            ..AuthConfig::default()
        };
        config.tls = tls;
        RunningServer::start(config).await.expect("starts")
    }

    /// A fresh temporary folder.
    pub fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "freshd-client-{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A CA and the certificates it signs.
    pub struct Pki {
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        pub fn new(name: &str) -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(
                rcgen::DnType::CommonName,
                format!("freshd client test CA {name}"),
            );
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                    .unwrap();
            Self { ca }
        }

        /// The CA's certificate, PEM.
        pub fn ca_pem(&self) -> String {
            self.ca.pem()
        }

        /// A leaf certificate and its key, PEM.
        pub fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
            let mut params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            params.extended_key_usages = vec![if client {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        /// Writes the CA's certificate to `dir/<file>` and returns the path.
        pub fn write_ca(&self, dir: &Path, file: &str) -> PathBuf {
            let path = dir.join(file);
            std::fs::write(&path, self.ca_pem()).unwrap();
            path
        }

        /// The TLS settings of a server whose certificate (for `localhost`
        /// and `127.0.0.1`) this CA signs, written into `dir`; `client_ca`
        /// turns on mutual TLS.
        pub fn server_tls(&self, dir: &Path, client_ca: Option<PathBuf>) -> TlsConfig {
            let (cert, key) = self.leaf(&["localhost", "127.0.0.1"], false);
            let (c, k) = (dir.join("server.pem"), dir.join("server.key"));
            std::fs::write(&k, key).unwrap();
            std::fs::write(&c, cert).unwrap();
            TlsConfig {
                cert: c,
                key: k,
                client_ca,
                reload_interval: Duration::from_secs(60),
            }
        }
    }
}
