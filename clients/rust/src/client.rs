//! [`Client`]: the typed client of `freshd.v1.Coordinator`, and [`Watch`],
//! one invalidation stream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::credentials::{BearerToken, Pem, Secret, TlsSettings};
use crate::error::{innermost, Error, Result};
use crate::pb::{
    self, coordinator_client::CoordinatorClient, watch_request::Request as In,
    watch_response::Response as Out,
};

/// The address freshd listens on by default.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// The generated stub behind a [`Client`], which sends its token with every
/// request: see [`Client::authorized_stub`].
pub type AuthorizedStub = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Settings of a [`Client`], from [`Client::builder`].
///
/// Security: [`token`](Self::token) sends `authorization: Bearer <token>`
/// with every request; the `tls_*` settings make the connection TLS. An
/// address without a scheme means `http://`, or `https://` when a `tls_*`
/// setting is given; an `https://` address with no CA given trusts the
/// system's roots (feature `native-roots`, on by default).
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    addr: String,
    client_id: String,
    connect_timeout: Duration,
    timeout: Option<Duration>,
    max_message_bytes: usize,
    connection_window: u32,
    token: Option<Secret>,
    tls: TlsSettings,
}

/// The default of [`ClientBuilder::connection_window`].
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 << 20;

impl ClientBuilder {
    /// The bearer token sent with every request, Watch streams included, as
    /// `authorization: Bearer <token>` (`freshd --new-token` makes one). A
    /// server with principals configured answers [`Error::Unauthenticated`]
    /// without one. A token that cannot be sent in a header fails the
    /// connect with [`Error::InvalidSetting`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret(token.into()));
        self
    }

    /// Trusts the CA certificate(s) in `pem` (PEM text) for the server's
    /// certificate instead of the system's roots; repeat it to trust more.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca.push(Pem::Bytes(pem.into()));
        self
    }

    /// The same with the PEM read from `path` at connect time (an
    /// unreadable file fails it with [`Error::InvalidSetting`]).
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca.push(Pem::File(path.into()));
        self
    }

    /// A client certificate chain and its private key (PEM text), for a
    /// server that requires mutual TLS (`--tls-client-ca`).
    pub fn tls_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.identity = Some((Pem::Bytes(cert_pem.into()), Pem::Bytes(key_pem.into())));
        self
    }

    /// The same with the PEM read from files at connect time.
    pub fn tls_identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls.identity = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// The name the server's certificate must carry, when it is not the
    /// address's host (say, dialing an IP address or a load balancer).
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls.domain = Some(domain.into());
        self
    }

    /// The client's id. It is sent with every publish, fill, check, purge and
    /// Watch stream that does not name one itself, so that the server's
    /// freshness metrics and `no_loop` streams can tell this client apart.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one unary call may take (default 30 s; `None`: no limit).
    /// Watch streams are not limited.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest message either way (default 16 MiB, the server's default).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// The HTTP/2 connection's receive window: the most bytes the server
    /// may send that the application has not read (default 16 MiB,
    /// [`DEFAULT_CONNECTION_WINDOW`]; at least 64 KiB). It also sizes h2's
    /// guard against floods of small frames: a connection holding more
    /// unread frames under 256 bytes than half of it allows (each costing
    /// 256 minus its length) is ended with `ENHANCE_YOUR_CALM`. A Watch
    /// notice is one such frame, so the default lets about 40,000 unread
    /// notices wait on a connection (hyper's own 5 MiB, about 12,700).
    /// Read Watch streams promptly all the same.
    pub fn connection_window(mut self, bytes: u32) -> Self {
        self.connection_window = bytes.max(65_535);
        self
    }

    /// Whether the connection uses TLS: an `https://` address, or any
    /// `tls_*` setting.
    fn uses_tls(&self) -> bool {
        self.addr.starts_with("https://") || self.tls.is_set()
    }

    /// The address to dial, with its scheme, and the checked settings.
    fn prepare(&mut self) -> Result<(Endpoint, BearerToken)> {
        if !self.addr.contains("://") {
            let scheme = if self.tls.is_set() { "https" } else { "http" };
            self.addr = format!("{scheme}://{}", self.addr);
        }
        if self.tls.is_set() && !self.addr.starts_with("https://") {
            return Err(Error::InvalidSetting {
                setting: "tls".into(),
                message: format!(
                    "TLS settings are given for {}, a plaintext address: write https://",
                    self.addr
                ),
            });
        }
        let token = match &self.token {
            Some(Secret(token)) => BearerToken::new(token)?,
            None => BearerToken::none(),
        };
        let mut endpoint = Endpoint::from_shared(self.addr.clone())
            .map(|e| {
                e.connect_timeout(self.connect_timeout)
                    .initial_connection_window_size(self.connection_window)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true)
            })
            .map_err(|e| Error::InvalidAddress {
                addr: self.addr.clone(),
                message: innermost(&e),
            })?;
        if self.uses_tls() {
            endpoint =
                endpoint
                    .tls_config(self.tls.config()?)
                    .map_err(|e| Error::InvalidSetting {
                        setting: "tls".into(),
                        message: innermost(&e),
                    })?;
        }
        Ok((endpoint, token))
    }

    fn with_channel(self, channel: Channel, token: BearerToken) -> Client {
        let stub = CoordinatorClient::with_interceptor(channel.clone(), token)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        Client {
            stub,
            channel,
            max_message_bytes: self.max_message_bytes,
            addr: self.addr.into(),
            client_id: self.client_id.into(),
            timeout: self.timeout,
        }
    }

    /// Connects now: fails with [`Error::Connect`] when the server cannot be
    /// reached or the TLS handshake fails (an untrusted certificate, a name
    /// that does not match, a client certificate the server refuses). The
    /// connection is re-established on its own later.
    pub async fn connect(mut self) -> Result<Client> {
        let (endpoint, token) = self.prepare()?;
        let channel = endpoint
            .connect_with_connector(crate::coalesce::Connector)
            .await
            .map_err(|e| Error::Connect {
                addr: self.addr.clone(),
                message: innermost(&e),
            })?;
        Ok(self.with_channel(channel, token))
    }

    /// Connects at the first call: never fails for an unreachable server,
    /// whose calls fail with [`Error::Connect`] until it is up. Settings
    /// that cannot be used (an unreadable CA file, say) fail here.
    pub fn connect_lazy(mut self) -> Result<Client> {
        let (endpoint, token) = self.prepare()?;
        let channel = endpoint.connect_with_connector_lazy(crate::coalesce::Connector);
        Ok(self.with_channel(channel, token))
    }
}

/// The typed client of a freshd server. Cheap to clone: clones share one
/// connection.
///
/// Every method maps the server's status codes to [`Error`]; the messages are
/// the server's. Request types have constructors and `with_*` setters (see
/// [`crate::pb`]).
#[derive(Debug, Clone)]
pub struct Client {
    stub: AuthorizedStub,
    channel: Channel,
    max_message_bytes: usize,
    addr: Arc<str>,
    client_id: Arc<str>,
    timeout: Option<Duration>,
}

/// Adds `http://` to an address given as `host:port`.
pub fn normalize_addr(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Client {
    /// Settings for a client of the server at `addr` (`http://host:port`,
    /// `https://host:port` for TLS; `host:port` works too).
    pub fn builder(addr: impl AsRef<str>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.as_ref().to_owned(),
            client_id: String::new(),
            connect_timeout: Duration::from_secs(5),
            timeout: Some(Duration::from_secs(30)),
            max_message_bytes: 16 << 20,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            token: None,
            tls: TlsSettings::default(),
        }
    }

    /// Connects to the server at `addr` with the default settings.
    pub async fn connect(addr: impl AsRef<str>) -> Result<Self> {
        Self::builder(addr).connect().await
    }

    /// The address the client dials.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The client's id ("" when none was set).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// A client on the same connection that names itself `client_id`.
    pub fn with_client_id(&self, client_id: impl Into<String>) -> Client {
        Client {
            client_id: client_id.into().into(),
            ..self.clone()
        }
    }

    /// A client on the same connection that sends `token` instead (say, a
    /// service acting for several principals). Errors:
    /// [`Error::InvalidSetting`] for a token that cannot be sent.
    pub fn with_token(&self, token: &str) -> Result<Client> {
        let stub =
            CoordinatorClient::with_interceptor(self.channel.clone(), BearerToken::new(token)?)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes);
        Ok(Client {
            stub,
            ..self.clone()
        })
    }

    /// The generated stub, for what this type does not cover. Its requests
    /// carry no token: with a token, use [`Client::authorized_stub`].
    pub fn stub(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// The generated stub that sends the client's token with every request.
    pub fn authorized_stub(&self) -> AuthorizedStub {
        self.stub.clone()
    }

    fn fill_client_id(&self, id: &mut String) {
        if id.is_empty() {
            id.push_str(&self.client_id);
        }
    }

    async fn unary<T, F>(&self, call: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "no answer from {} within {limit:?}",
                        self.addr
                    )))
                }
            },
            None => call.await,
        };
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| Error::from_status(s, &self.addr))
    }

    /// Publishes changes: each key and its transitive dependents are bumped
    /// once. Errors: [`Error::InvalidArgument`].
    pub async fn publish(
        &self,
        request: impl Into<pb::PublishRequest>,
    ) -> Result<pb::PublishResponse> {
        let mut request = request.into();
        self.fill_client_id(&mut request.client_id);
        self.unary(self.stub.clone().publish(request)).await
    }

    /// Publishes plain changes of `keys`.
    pub async fn publish_keys<K: Into<String>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<pb::PublishResponse> {
        let changes: Vec<pb::Change> = keys.into_iter().map(|k| pb::Change::new(k)).collect();
        self.publish(pb::PublishRequest::new(changes)).await
    }

    /// Registers a cached key with its dependencies. Errors:
    /// [`Error::FillRaced`] (refetch and fill again),
    /// [`Error::FailedPrecondition`] (lease not held), [`Error::InvalidArgument`].
    pub async fn fill(&self, request: impl Into<pb::FillRequest>) -> Result<pb::FillResponse> {
        let mut request = request.into();
        self.fill_client_id(&mut request.client_id);
        self.unary(self.stub.clone().fill(request)).await
    }

    /// Checks one cached copy: the fact and the policy's decision.
    pub async fn check(&self, request: impl Into<pb::CheckRequest>) -> Result<pb::CheckResponse> {
        let mut request = request.into();
        self.fill_client_id(&mut request.client_id);
        self.unary(self.stub.clone().check(request)).await
    }

    /// Checks many copies, answered from one consistent state.
    pub async fn check_batch(
        &self,
        request: impl Into<pb::CheckBatchRequest>,
    ) -> Result<pb::CheckBatchResponse> {
        let mut request = request.into();
        self.fill_client_id(&mut request.client_id);
        self.unary(self.stub.clone().check_batch(request)).await
    }

    /// Everything freshd holds for `key`. Errors: [`Error::NotFound`].
    pub async fn inspect(&self, key: impl Into<String>) -> Result<pb::InspectResponse> {
        let request = pb::InspectRequest { key: key.into() };
        self.unary(self.stub.clone().inspect(request)).await
    }

    /// Server-wide counters and the open Watch streams.
    pub async fn stats(&self) -> Result<pb::StatsResponse> {
        self.unary(self.stub.clone().stats(pb::StatsRequest {}))
            .await
    }

    /// Asks for the fill lease of a key before reading the origin.
    pub async fn lease(&self, request: impl Into<pb::LeaseRequest>) -> Result<pb::LeaseResponse> {
        self.unary(self.stub.clone().lease(request.into())).await
    }

    /// Purges a prefix (soft by default; see [`pb::PurgeRequest`]). Errors:
    /// [`Error::FailedPrecondition`] (blast radius), [`Error::ResourceExhausted`]
    /// (rate).
    pub async fn purge(&self, request: impl Into<pb::PurgeRequest>) -> Result<pb::PurgeResponse> {
        let mut request = request.into();
        self.fill_client_id(&mut request.client_id);
        self.unary(self.stub.clone().purge(request)).await
    }

    /// The policy that applies to `namespace` ("" names the default).
    pub async fn get_policy(&self, namespace: impl Into<String>) -> Result<pb::NamespacePolicy> {
        let request = pb::GetPolicyRequest {
            namespace: namespace.into(),
        };
        self.unary(self.stub.clone().get_policy(request)).await
    }

    /// Sets the policy of `namespace` ("" sets the default).
    pub async fn set_policy(
        &self,
        namespace: impl Into<String>,
        policy: pb::FreshnessPolicy,
    ) -> Result<pb::NamespacePolicy> {
        let request = pb::SetPolicyRequest {
            namespace: namespace.into(),
            policy: Some(policy),
        };
        self.unary(self.stub.clone().set_policy(request)).await
    }

    /// Every policy: the default first, then namespaces in order.
    pub async fn list_policies(&self) -> Result<Vec<pb::NamespacePolicy>> {
        let response = self
            .unary(self.stub.clone().list_policies(pb::ListPoliciesRequest {}))
            .await?;
        Ok(response.policies)
    }

    /// Removes the policy of `namespace`, which falls back to the default.
    /// Errors: [`Error::NotFound`], [`Error::InvalidArgument`] (the default).
    pub async fn delete_policy(&self, namespace: impl Into<String>) -> Result<()> {
        let request = pb::DeletePolicyRequest {
            namespace: namespace.into(),
        };
        self.unary(self.stub.clone().delete_policy(request))
            .await
            .map(|_| ())
    }

    /// Opens a Watch stream and waits for its `started` message. A start the
    /// server refuses (a bad key, a limit) fails here with its status.
    pub async fn watch(&self, mut start: pb::WatchStart) -> Result<Watch> {
        self.fill_client_id(&mut start.client_id);
        let (tx, rx) = mpsc::unbounded_channel();
        let sender = WatchSender {
            tx,
            sent: Arc::default(),
        };
        sender.send(In::Start(start))?;
        let mut stub = self.stub.clone();
        let opening = stub.watch(UnboundedReceiverStream::new(rx));
        let open = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, opening)
                .await
                .map_err(|_| Error::Timeout(format!("Watch did not open within {limit:?}")))?,
            None => opening.await,
        };
        let mut inbound = open
            .map_err(|s| Error::from_status(s, &self.addr))?
            .into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Error::Closed("the Watch stream ended before `started`".into()))?
            .map_err(|s| Error::from_status(s, &self.addr))?;
        let Some(Out::Started(started)) = first.response else {
            return Err(Error::Protocol(format!(
                "the first message of a Watch stream was {:?}, not `started`",
                first.response
            )));
        };
        Ok(Watch {
            started,
            sender,
            inbound,
            addr: self.addr.clone(),
        })
    }
}

/// What a Watch stream delivers after `started`.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Notices in seq order; a batch never splits a seq, so its last seq is a
    /// valid resume token once applied.
    Notices(Vec<pb::Notice>),
    /// Every matching notice up to `seq` has been sent: a resume token.
    Progress(pb::Progress),
    /// Revalidate (or drop) everything held under the prefix ("" is all).
    Reset(pb::Reset),
    /// A `track` or `subscribe` the server refused, which changed nothing;
    /// the stream goes on. Only on a stream started with
    /// `refusals_in_band`: without it such a request ends the stream with
    /// the error.
    Refused(pb::Refused),
}

/// Sends requests on a Watch stream; cheap to clone. Sending never waits.
/// Each send returns the request's number on the stream (`start` was 1),
/// the number a [`WatchEvent::Refused`] names. Once the stream has ended a
/// send fails with [`Error::Closed`]; the stream's next event says why (the
/// server's error, or its end).
#[derive(Debug, Clone)]
pub struct WatchSender {
    tx: mpsc::UnboundedSender<pb::WatchRequest>,
    /// Requests sent so far: held while one is queued, so that numbers
    /// follow the order the server reads them in, whichever clone sends.
    sent: Arc<parking_lot::Mutex<u64>>,
}

impl WatchSender {
    fn send(&self, request: In) -> Result<u64> {
        let mut sent = self.sent.lock();
        self.tx
            .send(pb::WatchRequest {
                request: Some(request),
            })
            .map_err(|_| Error::Closed("the Watch stream is closed".into()))?;
        *sent += 1;
        Ok(*sent)
    }

    fn list<K: Into<String>>(keys: impl IntoIterator<Item = K>) -> pb::KeyList {
        pb::KeyList {
            keys: keys.into_iter().map(Into::into).collect(),
        }
    }

    /// Tracks exact keys. Track a key before reading it from the origin.
    pub fn track<K: Into<String>>(&self, keys: impl IntoIterator<Item = K>) -> Result<u64> {
        self.send(In::Track(Self::list(keys)))
    }

    /// Stops tracking keys.
    pub fn untrack<K: Into<String>>(&self, keys: impl IntoIterator<Item = K>) -> Result<u64> {
        self.send(In::Untrack(Self::list(keys)))
    }

    /// Watches prefixes (every notice under them).
    pub fn subscribe<K: Into<String>>(&self, prefixes: impl IntoIterator<Item = K>) -> Result<u64> {
        self.send(In::Subscribe(Self::list(prefixes)))
    }

    /// Stops watching prefixes.
    pub fn unsubscribe<K: Into<String>>(
        &self,
        prefixes: impl IntoIterator<Item = K>,
    ) -> Result<u64> {
        self.send(In::Unsubscribe(Self::list(prefixes)))
    }

    /// Acknowledges every notice up to `seq` as applied.
    pub fn ack(&self, seq: u64) -> Result<u64> {
        self.send(In::Ack(pb::Ack { seq }))
    }

    /// Asks for a progress watermark, sent after everything queued.
    pub fn progress(&self) -> Result<u64> {
        self.send(In::Progress(pb::ProgressRequest {}))
    }
}

/// One open Watch stream, from [`Client::watch`]. Dropping it closes the
/// client's side, which ends the stream. Its sending methods return the
/// request's number on the stream, as [`WatchSender`]'s do.
#[derive(Debug)]
pub struct Watch {
    /// The server's `started` message: epoch, start seq and outcome.
    pub started: pb::WatchStarted,
    sender: WatchSender,
    inbound: tonic::Streaming<pb::WatchResponse>,
    addr: Arc<str>,
}

impl Watch {
    /// The next event; `None` when the server ended the stream without an
    /// error. A stream that ends with an error (`UNAVAILABLE` at shutdown,
    /// whose message holds a resume token; `RESOURCE_EXHAUSTED` past a limit)
    /// yields it once.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            let message = match self.inbound.next().await? {
                Ok(m) => m,
                Err(status) => return Some(Err(Error::from_status(status, &self.addr))),
            };
            return Some(Ok(match message.response {
                Some(Out::Notices(batch)) => WatchEvent::Notices(batch.notices),
                Some(Out::Progress(p)) => WatchEvent::Progress(p),
                Some(Out::Reset(r)) => WatchEvent::Reset(r),
                Some(Out::Refused(r)) => WatchEvent::Refused(r),
                Some(Out::Started(_)) => {
                    return Some(Err(Error::Protocol(
                        "`started` arrived twice on one Watch stream".into(),
                    )))
                }
                // A message from a newer server with a response this client
                // does not know: skip it.
                None => continue,
            }));
        }
    }

    /// A sender for this stream's requests.
    pub fn sender(&self) -> WatchSender {
        self.sender.clone()
    }

    /// Tracks exact keys.
    pub fn track<K: Into<String>>(&self, keys: impl IntoIterator<Item = K>) -> Result<u64> {
        self.sender.track(keys)
    }

    /// Stops tracking keys.
    pub fn untrack<K: Into<String>>(&self, keys: impl IntoIterator<Item = K>) -> Result<u64> {
        self.sender.untrack(keys)
    }

    /// Watches prefixes.
    pub fn subscribe<K: Into<String>>(&self, prefixes: impl IntoIterator<Item = K>) -> Result<u64> {
        self.sender.subscribe(prefixes)
    }

    /// Stops watching prefixes.
    pub fn unsubscribe<K: Into<String>>(
        &self,
        prefixes: impl IntoIterator<Item = K>,
    ) -> Result<u64> {
        self.sender.unsubscribe(prefixes)
    }

    /// Acknowledges every notice up to `seq` as applied.
    pub fn ack(&self, seq: u64) -> Result<u64> {
        self.sender.ack(seq)
    }

    /// Asks for a progress watermark.
    pub fn progress(&self) -> Result<u64> {
        self.sender.progress()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(normalize_addr("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(normalize_addr("https://freshd:443"), "https://freshd:443");
    }

    #[tokio::test]
    async fn a_bad_address_is_refused_before_dialing() {
        let e = Client::builder("http://bad host:1")
            .connect_lazy()
            .unwrap_err();
        assert!(matches!(e, Error::InvalidAddress { .. }), "{e:?}");
    }
}
