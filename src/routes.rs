//! Serving accepted connections (HTTP/2 with h2, in [`crate::conn`]), and a
//! router that hands each request to the gRPC service its path names.
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
//! `Watch` is served without tonic's generated handler: the router reads the
//! stream's first message, registers it, and the stream's task writes its
//! messages to the HTTP/2 stream itself ([`crate::conn::GrpcOutbox`]), with
//! no channel, response body or task of its own in between. The
//! Coordinator's generated `Watch` stays for callers that embed the service.
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
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::service::interceptor::{InterceptedService, ResponseFuture};
use tonic::service::Interceptor as _;
use tonic::{Status, Streaming};
use tower::util::BoxCloneSyncService;

use crate::auth::Interceptor;
use crate::conn::{run_inline_first, Exchange, GrpcOutbox, RequestBody};
use crate::pb::coordinator_server::CoordinatorServer;
use crate::service::CoordinatorService;
use crate::tls::{Conn, ConnInfo};

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
const WATCH: &str = "/freshd.v1.Coordinator/Watch";

/// Watch streams, served by the router itself.
#[derive(Clone)]
pub struct DirectWatch {
    service: Arc<CoordinatorService>,
    /// Authenticates each stream, when tokens are required.
    interceptor: Option<Interceptor>,
    /// Most bytes of one message, either way.
    max_message_bytes: usize,
}

impl DirectWatch {
    /// Watch streams served by `service`, authenticated by `interceptor`
    /// when `required`, with messages of at most `max_message_bytes`.
    pub fn new(
        service: Arc<CoordinatorService>,
        interceptor: Interceptor,
        required: bool,
        max_message_bytes: usize,
    ) -> Self {
        DirectWatch {
            service,
            interceptor: required.then_some(interceptor),
            max_message_bytes,
        }
    }

    /// Opens the stream: authenticates it, reads and checks its first
    /// message within the request's deadline, and registers it; then
    /// answers the headers and runs the stream's task, which writes to
    /// `reply`'s stream. A refusal is answered in the headers alone.
    async fn open(
        self,
        request: Request<RequestBody>,
        mut reply: SendResponse<Bytes>,
        info: ConnInfo,
        deadline: Option<Instant>,
    ) {
        let (parts, body) = request.into_parts();
        let mut caller = tonic::Request::from_http(Request::from_parts(parts, ()));
        caller.extensions_mut().insert(info);
        if let Some(mut interceptor) = self.interceptor.clone() {
            match interceptor.call(caller) {
                Ok(authenticated) => caller = authenticated,
                Err(status) => return refuse(&mut reply, status),
            }
        }
        let inbound = Streaming::new_request(
            crate::codec::Decoder::<crate::pb::WatchRequest>::default(),
            body,
            None,
            Some(self.max_message_bytes),
        );
        let opening = self.service.open_watch(&caller, inbound);
        let opened = match deadline {
            Some(at) => match tokio::time::timeout_at(at, opening).await {
                Ok(opened) => opened,
                Err(_) => Err(Status::deadline_exceeded(
                    "the request's grpc-timeout passed",
                )),
            },
            None => opening.await,
        };
        match opened {
            Ok((registered, inbound)) => {
                let Ok(send) = reply.send_response(crate::conn::grpc_response(), false) else {
                    // The client is gone; the stream leaves the hub.
                    registered.cancel();
                    return;
                };
                registered.spawn(inbound, GrpcOutbox::new(send, self.max_message_bytes));
            }
            Err(status) => refuse(&mut reply, status),
        }
    }
}

/// Answers a request with `status` in the headers alone.
fn refuse(reply: &mut SendResponse<Bytes>, status: Status) {
    let _ = reply.send_response(status.into_http::<()>(), true);
}

/// The services freshd serves, by name.
#[derive(Clone)]
pub struct Routes {
    coordinator: Guarded<Coordinator>,
    watch: Option<DirectWatch>,
    others: Vec<(&'static str, Guarded<Boxed>)>,
}

impl Routes {
    /// Routes with `coordinator` only.
    pub fn new(coordinator: Guarded<Coordinator>) -> Self {
        Routes {
            coordinator,
            watch: None,
            others: Vec::new(),
        }
    }

    /// Serves Coordinator `Watch` streams with `watch` instead of the
    /// generated handler.
    pub fn watch(mut self, watch: DirectWatch) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Hands a request to its service, and its answer to the HTTP/2 stream.
    pub(crate) fn dispatch(
        &self,
        request: Request<RequestBody>,
        mut reply: SendResponse<Bytes>,
        info: &ConnInfo,
    ) {
        if let (Some(watch), WATCH) = (&self.watch, request.uri().path()) {
            let deadline = match grpc_timeout(request.headers()) {
                Ok(timeout) => timeout.map(|d| Instant::now() + d),
                Err(status) => return refuse(&mut reply, status),
            };
            tokio::spawn(watch.clone().open(request, reply, info.clone(), deadline));
            return;
        }
        run_inline_first(Exchange::new(self.call(request, info), reply));
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

    fn call(&self, request: Request<RequestBody>, info: &ConnInfo) -> Answer {
        let deadline = match grpc_timeout(request.headers()) {
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
        Answer {
            kind,
            // The clock is read now, so that the deadline counts from the
            // request's arrival; the timer is made only if the answer waits.
            deadline: match deadline {
                Some(d) => Deadline::Due(Instant::now() + d),
                None => Deadline::None,
            },
        }
    }
}

/// What a request's service answers, bounded by the request's deadline.
pub struct Answer {
    kind: Kind,
    deadline: Deadline,
}

/// A request's `grpc-timeout`: most answers come on their first poll, so
/// the timer is made only when one does not.
enum Deadline {
    None,
    Due(Instant),
    Armed(Pin<Box<Sleep>>),
}

enum Kind {
    Open(Call),
    Checked(ResponseFuture<Call>),
    Ready(Option<Response<Body>>),
}

impl Answer {
    fn ready(status: Status) -> Self {
        Answer {
            kind: Kind::Ready(Some(status.into_http())),
            deadline: Deadline::None,
        }
    }
}

impl Future for Answer {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answered = match &mut self.kind {
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
        };
        if answered.is_ready() {
            return answered;
        }
        if let Deadline::Due(at) = self.deadline {
            self.deadline = Deadline::Armed(Box::pin(tokio::time::sleep_until(at)));
        }
        if let Deadline::Armed(timer) = &mut self.deadline {
            ready!(timer.as_mut().poll(cx));
            let status = Status::deadline_exceeded("the request's grpc-timeout passed");
            return Poll::Ready(status.into_http());
        }
        Poll::Pending
    }
}

/// The longest `grpc-timeout` value: 8 digits.
const TIMEOUT_DIGITS: usize = 8;

/// The request's `grpc-timeout`, if it has one
/// (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).
fn grpc_timeout(headers: &HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || {
        Status::invalid_argument(format!(
            "grpc-timeout {value:?} is not 1 to {TIMEOUT_DIGITS} digits and a unit (H, M, S, m, u or n)"
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
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

/// Serves every connection `incoming` yields with `routes` until `drain`
/// completes; then stops accepting, tells every connection to finish, and
/// returns when the last one has closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Conn>,
    routes: Routes,
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
        tokio::spawn(crate::conn::serve(
            conn,
            routes.clone(),
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
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
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
        assert_eq!(grpc_timeout(&HeaderMap::new()).unwrap(), None);
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
