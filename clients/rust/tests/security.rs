//! Tokens and TLS against real servers: principals with scopes and quotas,
//! TLS with a CA made here, mutual TLS, and a Watch stream over both.

mod common;

use std::time::Duration;

use common::security::{principal, principals, start, temp_dir, token_of, Pki};
use freshd::auth::{Quotas, Scope};
use freshd_client::{pb, Client, Error, WatchEvent};

#[tokio::test]
async fn a_known_token_is_accepted() {
    let server = start(principals(), None).await;
    let client = Client::builder(server.url())
        .token(token_of("admin"))
        .connect()
        .await
        .unwrap();
    let published = client.publish_keys(["feed:1"]).await.unwrap();
    let check = client
        .check(pb::CheckRequest::new("feed:1", 0))
        .await
        .unwrap();
    assert_eq!(check.version, published.seq);
    assert_eq!(client.stats().await.unwrap().seq, published.seq);
    // The raw stub carries the token too when asked for.
    client
        .authorized_stub()
        .inspect(pb::InspectRequest {
            key: "feed:1".into(),
        })
        .await
        .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_unknown_token_is_unauthenticated() {
    let server = start(principals(), None).await;

    // `connect(url)` still works; the server refuses the calls.
    let anonymous = Client::connect(server.url()).await.unwrap();
    let e = anonymous.publish_keys(["feed:1"]).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unauthenticated(m) if m.contains("requires a token")),
        "{e:?}"
    );
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated));
    assert!(!e.is_unreachable());
    let e = anonymous
        .stub()
        .stats(pb::StatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unauthenticated,
        "the raw stub sends no token"
    );

    let stranger = Client::builder(server.url())
        .token("fd_nobody_has_this_token")
        .connect()
        .await
        .unwrap();
    let e = stranger
        .check(pb::CheckRequest::new("feed:1", 0))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unauthenticated(m) if m.contains("unknown token")),
        "{e:?}"
    );
    let e = stranger
        .watch(pb::WatchStart::new().with_subscribe(["feed:"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");

    // A token that cannot be sent is refused before dialing.
    let e = Client::builder(server.url())
        .token("two words")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidSetting { setting, .. } if setting == "token"),
        "{e:?}"
    );
    assert!(!format!("{:?}", Client::builder("x").token("fd_secret")).contains("fd_secret"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn out_of_scope_calls_are_permission_denied() {
    let server = start(principals(), None).await;
    let feed = Client::builder(server.url())
        .token(token_of("feed"))
        .connect()
        .await
        .unwrap();
    feed.fill(pb::FillRequest::new("feed:1", ["posts:1"]))
        .await
        .unwrap();
    let e = feed.publish_keys(["feed:1"]).await.unwrap_err();
    let Error::PermissionDenied(message) = &e else {
        panic!("{e:?}")
    };
    for part in ["\"feed\"", "\"publish\""] {
        assert!(message.contains(part), "{message}");
    }
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied));
    let e = feed
        .watch(pb::WatchStart::new().with_subscribe(["posts:"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("watch")),
        "{e:?}"
    );
    let e = feed.stats().await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");

    // Another token on the same connection.
    let admin = feed.with_token(&token_of("admin")).unwrap();
    admin.publish_keys(["feed:1"]).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_quota_is_resource_exhausted_naming_it() {
    let quotas = Quotas {
        streams: Some(1),
        ..Quotas::default()
    };
    let server = start(vec![principal("one", &[("*", &Scope::ALL)], quotas)], None).await;
    let client = Client::builder(server.url())
        .token(token_of("one"))
        .connect()
        .await
        .unwrap();
    let _first = client
        .watch(pb::WatchStart::new().with_subscribe(["feed:"]))
        .await
        .unwrap();
    let e = client
        .watch(pb::WatchStart::new().with_subscribe(["feed:"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("quota streams")),
        "{e:?}"
    );
    server.stop().await.unwrap();
}

/// Connects with `builder` and makes one call.
async fn works(builder: freshd_client::ClientBuilder) -> Result<(), Error> {
    let client = builder
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    client.check(pb::CheckRequest::new("feed:1", 0)).await?;
    Ok(())
}

#[tokio::test]
async fn tls_with_a_ca_verifies_the_server() {
    let dir = temp_dir("tls");
    let pki = Pki::new("servers");
    let server = start(principals(), Some(pki.server_tls(&dir, None))).await;
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let port = server.addr.port();
    let admin = || Client::builder(&url).token(token_of("admin"));

    works(admin().tls_ca_pem(pki.ca_pem())).await.unwrap();
    let ca_file = pki.write_ca(&dir, "ca.pem");
    works(admin().tls_ca_file(&ca_file)).await.unwrap();
    // host:port with a TLS setting is https://; the name can be overridden.
    works(
        Client::builder(format!("127.0.0.1:{port}"))
            .token(token_of("admin"))
            .tls_ca_file(&ca_file)
            .tls_domain("localhost"),
    )
    .await
    .unwrap();
    works(
        Client::builder(format!("https://localhost:{port}"))
            .token(token_of("admin"))
            .tls_ca_pem(pki.ca_pem()),
    )
    .await
    .unwrap();

    // A server certificate from another CA is refused.
    let stranger = Pki::new("stranger");
    let e = works(admin().tls_ca_pem(stranger.ca_pem()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    // A name the certificate does not carry is refused.
    let e = works(
        admin()
            .tls_ca_pem(pki.ca_pem())
            .tls_domain("elsewhere.example"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");

    // Settings that cannot be used fail before dialing.
    let e = works(Client::builder(format!("http://127.0.0.1:{port}")).tls_ca_pem(pki.ca_pem()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidSetting { message, .. } if message.contains("https://")),
        "{e:?}"
    );
    let e = works(admin().tls_ca_file(dir.join("missing.pem")))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidSetting { setting, message } if setting == "tls_ca" && message.contains("missing.pem")),
        "{e:?}"
    );
    let e = works(admin().tls_ca_pem("not a certificate"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidSetting { .. }), "{e:?}");

    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn mutual_tls_sends_the_client_identity() {
    let dir = temp_dir("mtls");
    let servers = Pki::new("servers");
    let clients = Pki::new("clients");
    let client_ca = clients.write_ca(&dir, "clients-ca.pem");
    let server = start(
        principals(),
        Some(servers.server_tls(&dir, Some(client_ca))),
    )
    .await;
    let url = server.url();
    let (cert, key) = clients.leaf(&["client.example"], true);
    let builder = || {
        Client::builder(&url)
            .token(token_of("admin"))
            .tls_ca_pem(servers.ca_pem())
    };

    works(builder().tls_identity(cert.clone(), key.clone()))
        .await
        .unwrap();
    let (cert_file, key_file) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    works(builder().tls_identity_files(&cert_file, &key_file))
        .await
        .unwrap();

    // Without a certificate, or with one from another CA: no connection.
    let e = works(builder()).await.unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    let (other_cert, other_key) = Pki::new("stranger").leaf(&["client.example"], true);
    let e = works(builder().tls_identity(other_cert, other_key))
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");

    // The right certificate without a token: the handshake passes, the call
    // is refused.
    let e = works(
        Client::builder(&url)
            .tls_ca_pem(servers.ca_pem())
            .tls_identity(cert, key),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_watch_stream_over_tls_with_a_token_gets_notices() {
    let dir = temp_dir("watch");
    let pki = Pki::new("servers");
    let server = start(principals(), Some(pki.server_tls(&dir, None))).await;
    let connect = |name: &str| {
        Client::builder(server.url())
            .token(token_of(name))
            .tls_ca_pem(pki.ca_pem())
            .client_id(name)
            .connect()
    };
    let reader = connect("feed").await.unwrap();
    let writer = connect("admin").await.unwrap();

    let mut stream = reader
        .watch(pb::WatchStart::new().with_subscribe(["feed:"]))
        .await
        .unwrap();
    let published = writer
        .publish_keys(["posts:1", "feed:user:1"])
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a notice within 10 s")
        .expect("the stream is open")
        .unwrap();
    let WatchEvent::Notices(notices) = event else {
        panic!("{event:?}")
    };
    let keys: Vec<_> = notices.iter().map(|n| (n.key.as_str(), n.seq)).collect();
    assert_eq!(
        keys,
        [("feed:user:1", published.seq)],
        "only what the scope allows"
    );
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
