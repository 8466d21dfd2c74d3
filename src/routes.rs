//! Serving accepted connections (HTTP/2, in [`crate::conn`]), and a router
//! that hands each request to the gRPC service its path names.
//!
//! The router compares the service name with the Coordinator's, then with
//! the few others' (health, reflection), and a service that needs no token
//! is called as it is: no per-request layers of its own beyond the
//! `grpc-timeout` deadline. The Coordinator is called as its concrete type;
//! the others sit behind one boxed type, a box per call that their rare calls
//! can afford. A service that needs a token goes through the
//! authenticating [`Interceptor`], with the connection's [`ConnInfo`] in the
//! request's extensions. A path that names no service gets `UNIMPLEMENTED`;
//! an unknown method of a known service gets it from that service.
//!
//! `Watch` is served without tonic's generated handler: the router
//! ([`Direct`]) admits the stream from its head, reads its first message,
//! registers it, and the stream's task writes its messages to the HTTP/2
//! stream itself (`conn::GrpcOutbox`), with no channel, response body or
//! task of its own in between.
//!
//! So are `Check` and `CheckBatch`, the calls made on every cache hit: once
//! the connection has collected the request's one message, the router
//! decodes it with its strings borrowed from the request's bytes
//! ([`crate::wire::CheckRequestRef`]), asks the service, and writes the
//! answer and the OK trailers to the HTTP/2 stream. tonic's generated handler would decode each key into a
//! `String` of its own, and put its request, response and body layers in
//! between; for a check answered from memory those were a sixth of the
//! server's time. `Publish`, `Fill` and `Lease` (a cache's write and miss
//! paths) are read and answered the same way, decoded by prost and handed
//! to the service's trait methods with the caller in the request's
//! extensions. Authentication, `grpc-timeout`, `max_message_bytes`, the
//! errors and the metrics are the same either way; the other calls go
//! through the generated handlers, which stay for callers that embed the
//! service.
//!
//! Shutdown: when `drain` completes, accepting stops, every connection is
//! told to finish (HTTP/2 GOAWAY: in-flight requests complete, new ones are
//! refused) and [`serve`] returns once the last connection has closed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::service::interceptor::{InterceptedService, ResponseFuture};
use tonic::service::Interceptor as _;
use tonic::{Status, Streaming};
use tower::util::BoxCloneSyncService;

use crate::auth::{Caller, Interceptor, Principal};
use crate::conn::{frame, run_inline_first, Collecting, GrpcOutbox, RequestBody, Responder};
use crate::http2::head::RequestHead;
use crate::pb::coordinator_server::{Coordinator as _, CoordinatorServer};
use crate::service::CoordinatorService;
use crate::tls::{Conn, ConnInfo};
use crate::wire::{self, CheckBatchRequestRef, CheckRequestRef};

/// What a generated service's call returns.
type Call = BoxFuture<Response<Body>, Infallible>;

/// A service other than the Coordinator (health, reflection), behind one
/// type. Their calls are rare, so the box per call costs nothing that
/// matters; the Coordinator is called without one.
pub type Boxed = BoxCloneSyncService<Request<RequestBody>, Response<Body>, Infallible>;

/// The Coordinator as served.
type Coordinator = CoordinatorServer<CoordinatorService>;

/// A service, called as it is or after the authenticating interceptor.
#[derive(Clone)]
pub enum Guarded<S> {
    /// No token needed (auth off, or not required for this service).
    Open(S),
    /// Every request is authenticated first.
    Checked(InterceptedService<S, Interceptor>),
}

impl<S> Guarded<S>
where
    S: Service<Request<RequestBody>, Response = Response<Body>, Error = Infallible, Future = Call>
        + Clone,
{
    /// `service`, behind `interceptor` when it needs a token (`required`
    /// and auth on).
    pub fn new(service: S, interceptor: Interceptor, required: bool) -> Self {
        if required {
            Guarded::Checked(InterceptedService::new(service, interceptor))
        } else {
            Guarded::Open(service)
        }
    }

    fn call(&self, mut request: Request<RequestBody>, info: &ConnInfo) -> Kind {
        match self {
            Guarded::Open(service) => Kind::Open(service.clone().call(request)),
            Guarded::Checked(service) => {
                // The authenticator counts connections per principal.
                request.extensions_mut().insert(info.clone());
                Kind::Checked(service.clone().call(request))
            }
        }
    }
}

/// The path of the Coordinator's Watch method.
pub(crate) const WATCH: &str = "/freshd.v1.Coordinator/Watch";
/// The path of the Coordinator's Check method.
const CHECK: &[u8] = b"/freshd.v1.Coordinator/Check";
/// The path of the Coordinator's CheckBatch method.
const CHECK_BATCH: &[u8] = b"/freshd.v1.Coordinator/CheckBatch";
/// The path of the Coordinator's Publish method.
const PUBLISH: &[u8] = b"/freshd.v1.Coordinator/Publish";
/// The path of the Coordinator's Fill method.
const FILL: &[u8] = b"/freshd.v1.Coordinator/Fill";
/// The path of the Coordinator's Lease method.
const LEASE: &[u8] = b"/freshd.v1.Coordinator/Lease";

/// The Coordinator calls the router serves itself: Watch streams, and the
/// unary calls `Check`, `CheckBatch`, `Publish`, `Fill` and `Lease`.
#[derive(Clone)]
pub struct Direct {
    service: Arc<CoordinatorService>,
    /// Authenticates each stream, when tokens are required.
    interceptor: Option<Interceptor>,
    /// Most bytes of one message, either way.
    max_message_bytes: usize,
}

impl Direct {
    /// Calls served by `service`, authenticated by `interceptor` when
    /// `required`, with messages of at most `max_message_bytes`.
    pub fn new(
        service: Arc<CoordinatorService>,
        interceptor: Interceptor,
        required: bool,
        max_message_bytes: usize,
    ) -> Self {
        Direct {
            service,
            interceptor: required.then_some(interceptor),
            max_message_bytes,
        }
    }

    /// Most bytes of one message, either way.
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Admits a call from its head: its `grpc-timeout`, its encoding
    /// (identity only) and, when tokens are required, its token; the
    /// caller's principal and the timeout, or the refusal.
    pub(crate) fn admit(
        &self,
        head: &RequestHead,
        info: &ConnInfo,
    ) -> Result<(Option<Arc<Principal>>, Option<Duration>), Status> {
        let timeout = grpc_timeout(head.get(b"grpc-timeout"))?;
        identity_only(head.get(b"grpc-encoding"))?;
        let who = self.authenticate(head.get(b"authorization"), info)?;
        Ok((who, timeout))
    }

    /// The caller's principal, when tokens are required; the refusal when
    /// the call's `authorization` does not authenticate.
    fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        info: &ConnInfo,
    ) -> Result<Option<Arc<Principal>>, Status> {
        let Some(mut interceptor) = self.interceptor.clone() else {
            return Ok(None);
        };
        let mut caller = tonic::Request::new(());
        if let Some(value) = authorization.and_then(|v| MetadataValue::try_from(v).ok()) {
            caller.metadata_mut().insert("authorization", value);
        }
        caller.extensions_mut().insert(info.clone());
        let authenticated = interceptor.call(caller)?;
        Ok(authenticated
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.clone()))
    }

    /// Serves a unary call whose message is whole: decodes it, asks the
    /// service, writes the answer. Run in place, and spawned only when it
    /// waits (for a `min_seq`, the log), within the request's deadline; a
    /// reset by the client drops it.
    pub(crate) fn unary(&self, call: Collecting, message: Bytes, responder: Responder) {
        let Collecting {
            method,
            who,
            deadline,
            ..
        } = call;
        let service = self.service.clone();
        let max = self.max_message_bytes;
        run_inline_first(async move {
            let call = async {
                let service = &*service;
                match method {
                    Unary::Check => {
                        let mut owned = None;
                        let request = wire::decode::<CheckRequestRef>(&message, &mut owned)
                            .map_err(crate::codec::malformed)?;
                        let answer = service.check_ref(who.as_ref(), request).await?;
                        frame(&answer, max, "a Check answer")
                    }
                    Unary::CheckBatch => {
                        let mut owned = None;
                        let request = wire::decode::<CheckBatchRequestRef>(&message, &mut owned)
                            .map_err(crate::codec::malformed)?;
                        let answer = service.check_batch_ref(who.as_ref(), request).await?;
                        frame(&answer, max, "a CheckBatch answer")
                    }
                    Unary::Publish => {
                        let request = decoded(&message, who)?;
                        frame(
                            service.publish(request).await?.get_ref(),
                            max,
                            "a Publish answer",
                        )
                    }
                    Unary::Fill => {
                        let request = decoded(&message, who)?;
                        frame(service.fill(request).await?.get_ref(), max, "a Fill answer")
                    }
                    Unary::Lease => {
                        let request = decoded(&message, who)?;
                        frame(
                            service.lease(request).await?.get_ref(),
                            max,
                            "a Lease answer",
                        )
                    }
                }
            };
            let call = Bounded {
                future: std::pin::pin!(call),
                deadline,
            };
            match responder.unless_gone(call).await {
                // The client gave up (RST_STREAM) while the call waited.
                None => {}
                Some(None) => responder.refuse(deadline_passed()),
                Some(Some(answer)) => responder.answer(answer),
            }
        });
    }

    /// Opens the stream: reads and checks its first message within the
    /// request's deadline, and registers it; then answers the headers and
    /// runs the stream's task, which writes to the stream. A refusal is
    /// answered in the headers alone.
    pub(crate) async fn open(
        self,
        who: Option<Arc<Principal>>,
        body: RequestBody,
        mut responder: Responder,
        deadline: Option<Instant>,
    ) {
        let inbound = Streaming::new_request(
            crate::codec::Decoder::<crate::pb::WatchRequest>::default(),
            body,
            None,
            Some(self.max_message_bytes),
        );
        let opening = self.service.open_watch(who, inbound);
        let opened = match deadline {
            Some(at) => match tokio::time::timeout_at(at, opening).await {
                Ok(opened) => opened,
                Err(_) => Err(deadline_passed()),
            },
            None => opening.await,
        };
        match opened {
            Ok((registered, inbound)) => {
                if responder.open_stream().is_err() {
                    // The client is gone; the stream leaves the hub.
                    registered.cancel();
                    return;
                }
                registered.spawn(inbound, GrpcOutbox::new(responder, self.max_message_bytes));
            }
            Err(status) => responder.refuse(status),
        }
    }
}

/// The unary Coordinator calls the router serves itself: the checks,
/// decoded with their keys borrowed, and the other calls of a cache's
/// miss and write paths, decoded by prost and answered by the service's
/// generated-trait methods, without tonic's per-call layers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Unary {
    Check,
    CheckBatch,
    Publish,
    Fill,
    Lease,
}

impl Unary {
    /// The call `path` names, if the router serves it.
    pub(crate) fn of(path: &[u8]) -> Option<Self> {
        Some(match path {
            CHECK => Unary::Check,
            CHECK_BATCH => Unary::CheckBatch,
            PUBLISH => Unary::Publish,
            FILL => Unary::Fill,
            LEASE => Unary::Lease,
            _ => return None,
        })
    }
}

/// `message` decoded by prost, as a request from `who` (in its extensions,
/// where the authenticating interceptor leaves the principal).
fn decoded<M: prost::Message + Default>(
    message: &[u8],
    who: Option<Arc<Principal>>,
) -> Result<tonic::Request<M>, Status> {
    let mut request = tonic::Request::new(M::decode(message).map_err(crate::codec::malformed)?);
    if let Some(who) = who {
        request.extensions_mut().insert(Caller(who));
    }
    Ok(request)
}

/// The status of a call whose `grpc-timeout` passed.
fn deadline_passed() -> Status {
    Status::deadline_exceeded("the request's grpc-timeout passed")
}

/// The services freshd serves, by name.
#[derive(Clone)]
pub struct Routes {
    coordinator: Guarded<Coordinator>,
    direct: Option<Direct>,
    others: Vec<(&'static str, Guarded<Boxed>)>,
}

impl Routes {
    /// Routes with `coordinator` only.
    pub fn new(coordinator: Guarded<Coordinator>) -> Self {
        Routes {
            coordinator,
            direct: None,
            others: Vec::new(),
        }
    }

    /// Serves the Coordinator's `Watch`, `Check`, `CheckBatch`, `Publish`,
    /// `Fill` and `Lease` with `direct` instead of the generated handlers.
    pub fn direct(mut self, direct: Direct) -> Self {
        self.direct = Some(direct);
        self
    }

    /// The calls served without tonic's handlers, if any.
    pub(crate) fn direct_calls(&self) -> Option<&Direct> {
        self.direct.as_ref()
    }

    /// Adds `service` under its gRPC name, behind `interceptor` when
    /// `required`.
    pub fn add<S>(mut self, service: S, interceptor: Interceptor, required: bool) -> Self
    where
        S: Service<
                Request<RequestBody>,
                Response = Response<Body>,
                Error = Infallible,
                Future = Call,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let guarded = Guarded::new(Boxed::new(service), interceptor, required);
        self.others.push((S::NAME, guarded));
        self
    }

    /// The answer of `request`'s service, bounded by its deadline.
    pub(crate) fn call(&self, request: Request<RequestBody>, info: &ConnInfo) -> Answer {
        let timeout = request.headers().get("grpc-timeout").map(|v| v.as_bytes());
        let deadline = match grpc_timeout(timeout) {
            Ok(deadline) => deadline,
            Err(status) => return Answer::ready(status),
        };
        // "/<service>/<method>"
        let service = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map(|(service, _)| service);
        let kind = match service {
            Some(name) if name == Coordinator::NAME => self.coordinator.call(request, info),
            name => match name.and_then(|name| self.others.iter().find(|(n, _)| *n == name)) {
                Some((_, service)) => service.call(request, info),
                None => {
                    let path = request.uri().path();
                    return Answer::ready(Status::unimplemented(format!(
                        "no service serves {path}"
                    )));
                }
            },
        };
        // The clock is read now, so that the deadline counts from the
        // request's arrival; the timer is made only if the answer waits.
        Answer(Bounded {
            future: kind,
            deadline: Deadline::after(deadline),
        })
    }
}

/// What a request's service answers, bounded by the request's deadline.
pub struct Answer(Bounded<Kind>);

/// `future`, or `None` once `deadline` passes.
struct Bounded<F> {
    future: F,
    deadline: Deadline,
}

/// A request's `grpc-timeout`: most answers come on their first poll, so
/// the timer is made only when one does not.
pub(crate) enum Deadline {
    None,
    Due(Instant),
    Armed(Pin<Box<Sleep>>),
}

impl Deadline {
    /// `timeout` from now, if any.
    pub(crate) fn after(timeout: Option<Duration>) -> Self {
        match timeout {
            Some(d) => Deadline::Due(Instant::now() + d),
            None => Deadline::None,
        }
    }
}

impl<F: Future + Unpin> Future for Bounded<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(out) = Pin::new(&mut self.future).poll(cx) {
            return Poll::Ready(Some(out));
        }
        if let Deadline::Due(at) = self.deadline {
            self.deadline = Deadline::Armed(Box::pin(tokio::time::sleep_until(at)));
        }
        if let Deadline::Armed(timer) = &mut self.deadline {
            ready!(timer.as_mut().poll(cx));
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

enum Kind {
    Open(Call),
    Checked(ResponseFuture<Call>),
    Ready(Option<Response<Body>>),
}

impl Answer {
    fn ready(status: Status) -> Self {
        Answer(Bounded {
            future: Kind::Ready(Some(status.into_http())),
            deadline: Deadline::None,
        })
    }
}

impl Future for Kind {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Kind::Open(future) => future.as_mut().poll(cx).map(|r| match r {
                Ok(response) => response,
                Err(never) => match never {},
            }),
            Kind::Checked(future) => Pin::new(future).poll(cx).map(|r| match r {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            }),
            Kind::Ready(response) => {
                Poll::Ready(response.take().expect("an answer is polled once"))
            }
        }
    }
}

impl Future for Answer {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|| deadline_passed().into_http()))
    }
}

/// `UNIMPLEMENTED` when the request's messages are compressed
/// (`grpc-encoding` other than `identity`): freshd compresses nothing.
fn identity_only(encoding: Option<&[u8]>) -> Result<(), Status> {
    match encoding {
        None | Some(b"identity") => Ok(()),
        Some(value) => Err(Status::unimplemented(format!(
            "grpc-encoding {:?} is not supported: freshd accepts identity (uncompressed) messages only",
            String::from_utf8_lossy(value)
        ))),
    }
}

/// The longest `grpc-timeout` value: 8 digits.
const TIMEOUT_DIGITS: usize = 8;

/// The request's `grpc-timeout`, if it has one
/// (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).
fn grpc_timeout(value: Option<&[u8]>) -> Result<Option<Duration>, Status> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = || {
        Status::invalid_argument(format!(
            "grpc-timeout {:?} is not 1 to {TIMEOUT_DIGITS} digits and a unit (H, M, S, m, u or n)",
            String::from_utf8_lossy(value)
        ))
    };
    let text = std::str::from_utf8(value).map_err(|_| bad())?;
    if text.len() < 2 || text.len() > TIMEOUT_DIGITS + 1 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// Serves every connection `incoming` yields with `routes`, each within
/// `limits`, until `drain` completes;
/// then stops accepting, tells every connection to finish, and returns
/// when the last one has closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Conn>,
    routes: Routes,
    limits: crate::conn::ConnLimits,
    drain: impl Future<Output = ()>,
) {
    let (finish, finishing) = watch::channel(());
    tokio::pin!(drain);
    loop {
        let conn = tokio::select! {
            () = &mut drain => break,
            conn = incoming.recv() => match conn {
                Some(conn) => conn,
                None => break,
            },
        };
        let info = conn.info().clone();
        let socket = conn.socket();
        tokio::spawn(crate::conn::serve(
            conn,
            socket,
            routes.clone(),
            limits,
            info,
            finishing.clone(),
        ));
    }
    // Closing the channel stops the accept task (and the listener with it).
    drop(incoming);
    let _ = finish.send(());
    drop(finishing);
    finish.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(value: &str) -> Result<Option<Duration>, Status> {
        grpc_timeout(Some(value.as_bytes()))
    }

    #[tokio::test]
    async fn a_request_done_at_once_runs_in_place() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        crate::conn::run_inline_first(async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst)
        });
        // No await in between: it ran inside execute.
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_request_that_waits_is_spawned_and_finishes() {
        let (go, wait) = tokio::sync::oneshot::channel::<u32>();
        let (done, finished) = tokio::sync::oneshot::channel::<u32>();
        crate::conn::run_inline_first(async move {
            let n = wait.await.unwrap();
            done.send(n + 1).unwrap();
        });
        go.send(41).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the spawned request finishes")
            .unwrap();
        assert_eq!(n, 42);
    }

    #[tokio::test]
    async fn a_panicking_request_does_not_unwind_into_its_connection() {
        crate::conn::run_inline_first(async { panic!("a handler bug") });
        // Still here, and the runtime still runs other work.
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::conn::run_inline_first(async move {
            tokio::task::yield_now().await;
            tx.send(()).unwrap();
        });
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(grpc_timeout(None).unwrap(), None);
        assert_eq!(timeout("2H").unwrap(), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M").unwrap(), Some(Duration::from_secs(180)));
        assert_eq!(timeout("4S").unwrap(), Some(Duration::from_secs(4)));
        assert_eq!(timeout("250m").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u").unwrap(),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("1n").unwrap(), Some(Duration::from_nanos(1)));
    }

    #[test]
    fn grpc_timeout_rejects_what_the_spec_does_not_allow() {
        for bad in [
            "",
            "S",
            "1",
            "123456789S",
            "1s",
            "-1S",
            "+1S",
            "1.5S",
            "1 S",
        ] {
            let status = timeout(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(status.message().contains("grpc-timeout"), "{bad}");
        }
    }
}
