//! Serving accepted connections: hyper's HTTP/2 server on each one, and a
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
//! Shutdown: when `drain` completes, accepting stops, every connection is
//! told to finish (HTTP/2 GOAWAY: in-flight requests complete, new ones are
//! refused) and [`serve`] returns once the last connection has closed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::service::interceptor::{InterceptedService, ResponseFuture};
use tonic::Status;
use tower::util::BoxCloneSyncService;

use crate::auth::Interceptor;
use crate::pb::coordinator_server::CoordinatorServer;
use crate::service::CoordinatorService;
use crate::tls::{Conn, ConnInfo};

/// What a generated service's call returns.
type Call = BoxFuture<Response<Body>, Infallible>;

/// A service other than the Coordinator (health, reflection), behind one
/// type. Their calls are rare, so the box per call costs nothing that
/// matters; the Coordinator is called without one.
pub type Boxed = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

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
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = Call>
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

    fn call(&self, mut request: Request<Incoming>, info: &ConnInfo) -> Kind {
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

/// The services freshd serves, by name.
#[derive(Clone)]
pub struct Routes {
    coordinator: Guarded<Coordinator>,
    others: Vec<(&'static str, Guarded<Boxed>)>,
}

impl Routes {
    /// Routes with `coordinator` only.
    pub fn new(coordinator: Guarded<Coordinator>) -> Self {
        Routes {
            coordinator,
            others: Vec::new(),
        }
    }

    /// Adds `service` under its gRPC name, behind `interceptor` when
    /// `required`.
    pub fn add<S>(mut self, service: S, interceptor: Interceptor, required: bool) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = Call>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let guarded = Guarded::new(Boxed::new(service), interceptor, required);
        self.others.push((S::NAME, guarded));
        self
    }

    fn call(&self, request: Request<Incoming>, info: &ConnInfo) -> Answer {
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

/// One connection's requests, for hyper.
struct ConnService {
    routes: Routes,
    info: ConnInfo,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        self.routes.call(request, &self.info)
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
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answered = match &mut self.kind {
            Kind::Open(future) => future.as_mut().poll(cx),
            Kind::Checked(future) => Pin::new(future)
                .poll(cx)
                .map(|r| r.map(|response| response.map(Body::new))),
            Kind::Ready(response) => {
                Poll::Ready(Ok(response.take().expect("an answer is polled once")))
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
            return Poll::Ready(Ok(status.into_http()));
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

/// Runs each request's future (hyper's per-stream task) once in place, in
/// the connection's task, and spawns it only if it is not done: an answer
/// from memory (a `Check`, a `Publish`) then costs no task of its own and
/// no trip through the scheduler; a Watch stream, or a call that waits, is
/// spawned and polled again by its task, which registers its waker. A
/// panic in that first poll is caught and ends that request only (its
/// stream is reset when its future is dropped), as in a task of its own.
#[derive(Clone, Copy)]
struct InlineFirst;

impl<F> hyper::rt::Executor<F> for InlineFirst
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let mut future = Box::pin(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            future.as_mut().poll(&mut cx)
        }));
        match polled {
            Ok(Poll::Ready(())) => {}
            Ok(Poll::Pending) => {
                tokio::spawn(future);
            }
            Err(_) => tracing::error!("a request's handler panicked; its stream is reset"),
        }
    }
}

/// Serves every connection `incoming` yields with `routes` until `drain`
/// completes; then stops accepting, tells every connection to finish, and
/// returns when the last one has closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Conn>,
    routes: Routes,
    drain: impl Future<Output = ()>,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(InlineFirst);
    http2
        .timer(TokioTimer::new())
        // gRPC has no use for a Date header on every answer.
        .auto_date_header(false)
        // As tonic's server: streams per connection are not capped.
        .max_concurrent_streams(None);
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
        let service = ConnService {
            routes: routes.clone(),
            info: conn.info().clone(),
        };
        let connection = http2.serve_connection(TokioIo::new(conn), service);
        let mut finishing = finishing.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                biased;
                result = connection.as_mut() => result,
                _ = finishing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(finishing);
        });
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
        use hyper::rt::Executor;
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        InlineFirst.execute(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
        // No await in between: it ran inside execute.
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_request_that_waits_is_spawned_and_finishes() {
        use hyper::rt::Executor;
        let (go, wait) = tokio::sync::oneshot::channel::<u32>();
        let (done, finished) = tokio::sync::oneshot::channel::<u32>();
        InlineFirst.execute(async move {
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
        use hyper::rt::Executor;
        InlineFirst.execute(async { panic!("a handler bug") });
        // Still here, and the runtime still runs other work.
        let (tx, rx) = tokio::sync::oneshot::channel();
        InlineFirst.execute(async move {
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
