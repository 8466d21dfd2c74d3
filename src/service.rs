//! The gRPC handlers of `freshd.v1.Coordinator`: validate, call the store,
//! convert. Nothing else lives here.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Principal, Scope};
use crate::error::Error;
use crate::fanout::Subscriber;
use crate::lease::LeaseOutcome;
use crate::metrics::{CheckRecorder, RpcRecorder};
use crate::pb::{self, coordinator_server::Coordinator};
use crate::policy::{self, Decision};
use crate::store::{CheckAnswer, Freshness, Store};
use crate::validate::{self, Limits};
use crate::wire::{Borrowed, CheckBatchRequestRef, CheckRequestRef};

/// The Coordinator service over a shared [`Store`].
pub struct CoordinatorService {
    store: Arc<Store>,
    limits: Limits,
    /// False until the log is replayed and again from shutdown on.
    ready: Arc<std::sync::atomic::AtomicBool>,
    started: Instant,
    /// When recent purges ran, for `purges_per_minute`.
    purges: parking_lot::Mutex<std::collections::VecDeque<Instant>>,
    /// The RPC figures of the calls made on every cache hit.
    check_rpc: RpcRecorder,
    check_batch_rpc: RpcRecorder,
}

impl CoordinatorService {
    /// A service answering from `store` under `limits`.
    pub fn new(store: Arc<Store>, limits: Limits) -> Self {
        Self::with_gate(
            store,
            limits,
            Arc::new(std::sync::atomic::AtomicBool::new(true)),
        )
    }

    /// A service that answers UNAVAILABLE while `ready` is false (while the
    /// log is replayed, and from the moment shutdown begins).
    pub fn with_gate(
        store: Arc<Store>,
        limits: Limits,
        ready: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let metrics = store.metrics();
        let (check_rpc, check_batch_rpc) = (
            metrics.rpc_recorder("Check"),
            metrics.rpc_recorder("CheckBatch"),
        );
        Self {
            store,
            limits,
            ready,
            started: Instant::now(),
            purges: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            check_rpc,
            check_batch_rpc,
        }
    }

    /// UNAVAILABLE until the server is ready.
    fn gate(&self) -> Result<(), Status> {
        if self.ready.load(std::sync::atomic::Ordering::Acquire) {
            Ok(())
        } else {
            Err(Status::unavailable(
                "freshd is not serving: it is replaying its log or shutting down; retry",
            ))
        }
    }

    /// Records an RPC's code and latency.
    fn observe<T>(&self, method: &'static str, start: Instant, result: &Result<T, Status>) {
        self.store
            .metrics()
            .rpc(method, code(result), start.elapsed());
    }

    /// Records the freshness figures of one checked copy. A stale copy of a
    /// key that one of the client's streams tracks, whose last change that
    /// stream has already acknowledged, is a missed invalidation: the client
    /// should have dropped the copy when it applied the notice.
    #[allow(clippy::too_many_arguments)]
    fn record_check(
        &self,
        recorder: &mut CheckRecorder<'_>,
        key: &str,
        ns: &str,
        version: u64,
        age_ms: u64,
        served: bool,
        answer: &CheckAnswer,
        streams: &[Arc<Subscriber>],
    ) {
        let stale = answer.freshness == Freshness::Stale;
        recorder.record(ns, version, age_ms, served, stale, answer.critical_since);
        // Version 0 is a check without a copy (a miss noting the seq): it
        // cannot have missed anything.
        if !stale || version == 0 || answer.last_change_seq <= version {
            return;
        }
        if let Some(stream) = streams
            .iter()
            .find(|s| s.acked() >= answer.last_change_seq && s.tracks(key))
        {
            let metrics = self.store.metrics();
            metrics.missed(key, "check");
            stream.await_fill_for_repair(key, metrics.namespace_label(key));
        }
    }

    /// Read your writes: waits, bounded, until `min_seq` is applied.
    async fn wait_for(&self, min_seq: u64) -> Result<(), Status> {
        if min_seq == 0 || self.store.seq() >= min_seq {
            return Ok(());
        }
        let limit = self.limits.max_wait_for_seq;
        if self.store.wait_applied(min_seq, limit).await {
            return Ok(());
        }
        Err(Error::SeqNotApplied {
            min_seq,
            applied: self.store.seq(),
            waited_ms: limit.as_millis() as u64,
        }
        .into())
    }

    /// Runs `purge` unless `purges_per_minute` purges were applied in the
    /// last minute; only applied purges count. The lock serialises purges.
    fn rate_limited<T>(
        &self,
        purge: impl FnOnce() -> Result<(T, bool), Error>,
    ) -> Result<T, Status> {
        let now = Instant::now();
        let mut recent = self.purges.lock();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t).as_secs() >= 60)
        {
            recent.pop_front();
        }
        let limit = self.limits.purges_per_minute;
        if recent.len() as u64 >= limit {
            return Err(Error::PurgeRateLimited(recent.len() as u64, limit).into());
        }
        let (outcome, applied) = purge()?;
        if applied {
            recent.push_back(now);
        }
        Ok(outcome)
    }

    fn named_policy(&self, namespace: &str) -> pb::NamespacePolicy {
        let policies = self.store.policies();
        let (policy, is_default) = match policies.namespaces.get(namespace) {
            Some(p) if !namespace.is_empty() => (*p, false),
            _ => (policies.default, true),
        };
        pb::NamespacePolicy {
            namespace: namespace.to_owned(),
            policy: Some(validate::policy_to_pb(&policy)),
            is_default,
        }
    }

    /// Counts a quota refusal and turns it into its status.
    fn quota(&self, e: crate::auth::QuotaExceeded) -> Status {
        self.store.metrics().quota_refused(e.quota);
        e.into()
    }

    /// Whether a client's epoch (0: none given) matches the store's.
    fn same_epoch(&self, epoch: u64) -> bool {
        epoch == 0 || epoch == self.store.epoch()
    }

    /// `Check`, for `who` (when authentication is on), with the request's
    /// strings borrowed: the generated handler and the router's direct path
    /// ([`crate::routes`]) both answer with it.
    pub async fn check_ref(
        &self,
        who: Option<&Arc<Principal>>,
        request: CheckRequestRef<'_>,
    ) -> Result<pb::CheckResponse, Status> {
        let call = self.check_inner(who, request);
        self.gated(&self.check_rpc, call).await
    }

    /// `CheckBatch`, as [`CoordinatorService::check_ref`].
    pub async fn check_batch_ref(
        &self,
        who: Option<&Arc<Principal>>,
        request: CheckBatchRequestRef<'_>,
    ) -> Result<pb::CheckBatchResponse, Status> {
        let call = self.check_batch_inner(who, request);
        self.gated(&self.check_batch_rpc, call).await
    }

    /// Runs `call` unless the server is not ready, and records it in `rpc`.
    async fn gated<T>(
        &self,
        rpc: &RpcRecorder,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => call.await,
            Err(status) => Err(status),
        };
        rpc.record(self.store.metrics(), code(&result), start.elapsed());
        result
    }
}

/// The client id a check counts under: the request's, prefixed with the
/// principal's name when authentication is on.
fn owned_client_id<'a>(who: Option<&Arc<Principal>>, client_id: &'a str) -> Cow<'a, str> {
    match who {
        Some(who) => Cow::Owned(crate::auth::client_id(Some(who), client_id.to_owned())),
        None => Cow::Borrowed(client_id),
    }
}

/// A call's gRPC code.
fn code<T>(result: &Result<T, Status>) -> tonic::Code {
    result
        .as_ref()
        .map_or_else(|s| s.code(), |_| tonic::Code::Ok)
}

/// The authenticated principal of a request; `None` when authentication is
/// off.
fn caller<T>(request: &Request<T>) -> Option<Arc<Principal>> {
    request.extensions().get::<Caller>().map(|c| c.0.clone())
}

fn freshness(f: Freshness) -> pb::Freshness {
    match f {
        Freshness::Fresh => pb::Freshness::Fresh,
        Freshness::Stale => pb::Freshness::Stale,
        Freshness::Unknown => pb::Freshness::Unknown,
    }
}

fn decision(d: Decision) -> pb::Decision {
    match d {
        Decision::Fresh => pb::Decision::Fresh,
        Decision::Revalidate => pb::Decision::Revalidate,
        Decision::Refetch => pb::Decision::Refetch,
        Decision::Unknown => pb::Decision::Unknown,
    }
}

fn result(a: CheckAnswer, d: Decision, check_sample_rate: f64) -> pb::CheckResult {
    pb::CheckResult {
        freshness: freshness(a.freshness).into(),
        version: a.version,
        critical: a.critical,
        decision: decision(d).into(),
        check_sample_rate,
    }
}

const UNKNOWN: pb::CheckResult = pb::CheckResult {
    freshness: pb::Freshness::Unknown as i32,
    version: 0,
    critical: false,
    decision: pb::Decision::Unknown as i32,
    check_sample_rate: 1.0,
};

/// PERMISSION_DENIED unless `who` (when authenticated) administers
/// `namespace`; the default policy (`""`) needs admin on every namespace.
fn require_admin(who: Option<&Principal>, namespace: &str) -> Result<(), Status> {
    match who {
        None => Ok(()),
        Some(who) if namespace.is_empty() => {
            who.require_everywhere(Scope::Admin, "the default policy")
        }
        Some(who) => who.require(Scope::Admin, namespace),
    }
}

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type WatchStream = WatchStream;

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.list_policies_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("ListPolicies", start, &result);
        result
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.stats_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Stats", start, &result);
        result
    }

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.watch_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Watch", start, &result);
        result
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.publish_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Publish", start, &result);
        result
    }

    async fn fill(
        &self,
        request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.fill_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Fill", start, &result);
        result
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        self.check_ref(who.as_ref(), CheckRequestRef::of(&request))
            .await
            .map(Response::new)
    }

    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        self.check_batch_ref(who.as_ref(), CheckBatchRequestRef::of(&request))
            .await
            .map(Response::new)
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.lease_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Lease", start, &result);
        result
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.purge_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Purge", start, &result);
        result
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::NamespacePolicy>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.get_policy_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("GetPolicy", start, &result);
        result
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::NamespacePolicy>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.set_policy_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("SetPolicy", start, &result);
        result
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.delete_policy_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("DeletePolicy", start, &result);
        result
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let start = Instant::now();
        let result = match self.gate() {
            Ok(()) => self.inspect_inner(request).await,
            Err(status) => Err(status),
        };
        self.observe("Inspect", start, &result);
        result
    }
}

impl CoordinatorService {
    /// Opens a Watch stream for a caller served outside tonic's generated
    /// handler (the router's [`crate::routes::Direct`]): reads and
    /// checks the first message and registers the stream, counted as a
    /// `Watch` call, for `who` (when authentication is on).
    pub async fn open_watch(
        &self,
        who: Option<Arc<Principal>>,
        mut inbound: Streaming<pb::WatchRequest>,
    ) -> Result<(crate::watch::Registered, Streaming<pb::WatchRequest>), Status> {
        let start = Instant::now();
        let result = async {
            self.gate()?;
            let first = inbound.next().await.transpose()?;
            crate::watch::register(self.store.clone(), self.limits.clone(), who, first)
        }
        .await;
        self.observe("Watch", start, &result);
        result.map(|registered| (registered, inbound))
    }

    async fn watch_inner(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let who = caller(&request);
        let mut inbound = request.into_inner();
        let first = inbound.next().await.transpose()?;
        let rx = crate::watch::start(self.store.clone(), self.limits.clone(), who, first, inbound)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_inner(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        let client_id = crate::auth::client_id(who.as_ref(), request.client_id.clone());
        let changes = self.limits.publish(request)?;
        if let Some(who) = &who {
            for change in &changes {
                who.require_key(Scope::Publish, &change.key)?;
            }
            who.admit_fanout().map_err(|e| self.quota(e))?;
            who.publish(changes.len() as u64)
                .map_err(|e| self.quota(e))?;
        }
        let outcome = self.store.publish_from(&changes, &client_id)?;
        if let Some(who) = &who {
            who.charge_fanout(outcome.results.iter().map(|r| r.invalidated).sum());
        }
        self.store.wait_durable(outcome.seq).await;
        Ok(Response::new(pb::PublishResponse {
            seq: outcome.seq,
            epoch: self.store.epoch(),
            results: outcome
                .results
                .into_iter()
                .map(|r| pb::ChangeResult {
                    invalidated: r.invalidated,
                    duplicate: r.duplicate,
                    version: r.version,
                })
                .collect(),
        }))
    }

    async fn fill_inner(
        &self,
        request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        let who = caller(&request);
        let mut request = request.into_inner();
        if !self.same_epoch(request.epoch) {
            return Err(Error::EpochMismatch {
                got: request.epoch,
                current: self.store.epoch(),
            }
            .into());
        }
        let token = request.lease_token;
        let client_id =
            crate::auth::client_id(who.as_ref(), std::mem::take(&mut request.client_id));
        let mut spec = self.limits.fill(request, self.store.config())?;
        if let Some(who) = &who {
            who.require_key(Scope::Fill, &spec.key)?;
            // A dependency edge tells the filler when that key changes:
            // it needs the right to check it.
            for dependency in &spec.dependencies {
                who.require_key(Scope::Check, dependency)?;
            }
        }
        if token != 0 {
            let Some(lease_seq) = self.store.release_lease(&spec.key, token) else {
                return Err(Error::LeaseNotHeld {
                    key: spec.key,
                    token,
                }
                .into());
            };
            spec.observed_seq = if spec.observed_seq == 0 {
                lease_seq
            } else {
                spec.observed_seq.min(lease_seq)
            };
        }
        let outcome = self.store.fill(&spec)?;
        self.store.wait_durable(outcome.seq).await;
        for stream in self.store.hub().streams_of(&client_id) {
            stream.filled(&spec.key);
        }
        Ok(Response::new(pb::FillResponse {
            version: outcome.version,
            seq: outcome.seq,
            epoch: self.store.epoch(),
            ttl_ms: outcome.ttl_ms,
        }))
    }

    async fn check_inner(
        &self,
        who: Option<&Arc<Principal>>,
        request: CheckRequestRef<'_>,
    ) -> Result<pb::CheckResponse, Status> {
        self.limits.key(|| "key".to_owned(), request.key)?;
        if let Some(who) = who {
            who.require_key(Scope::Check, request.key)?;
        }
        let client_id = owned_client_id(who, request.client_id);
        self.wait_for(request.min_seq).await?;
        let policy = self.store.policy_for(request.key);
        let (answer, seq) = if self.same_epoch(request.epoch) {
            let (answer, seq) = self
                .store
                .check(request.key, request.version, request.age_ms);
            let streams = self.store.hub().streams_of(&client_id);
            self.record_check(
                &mut self.store.metrics().check_recorder(request.endpoint),
                request.key,
                policy::namespace(request.key),
                request.version,
                request.age_ms,
                request.served,
                &answer,
                &streams,
            );
            (
                result(
                    answer,
                    policy::decide(&policy, &answer, request.age_ms),
                    policy.check_sample_rate,
                ),
                seq,
            )
        } else {
            (UNKNOWN, self.store.seq())
        };
        Ok(pb::CheckResponse {
            freshness: answer.freshness,
            version: answer.version,
            critical: answer.critical,
            seq,
            epoch: self.store.epoch(),
            decision: answer.decision,
            check_sample_rate: policy.check_sample_rate,
        })
    }

    async fn check_batch_inner(
        &self,
        who: Option<&Arc<Principal>>,
        request: CheckBatchRequestRef<'_>,
    ) -> Result<pb::CheckBatchResponse, Status> {
        self.limits.batch("items", request.items.len())?;
        for (i, item) in request.items.iter().enumerate() {
            self.limits.key(|| format!("items[{i}].key"), item.key)?;
        }
        if let Some(who) = who {
            for item in &request.items {
                who.require_key(Scope::Check, item.key)?;
            }
        }
        let client_id = owned_client_id(who, request.client_id);
        self.wait_for(request.min_seq).await?;
        let (results, seq) = if self.same_epoch(request.epoch) {
            let (answers, seq) = self
                .store
                .check_batch(&request.items, |i| (i.key, i.version, i.age_ms));
            let policies = self.store.policies();
            let streams = self.store.hub().streams_of(&client_id);
            let mut recorder = self.store.metrics().check_recorder(request.endpoint);
            // A batch's keys mostly share a namespace: look its policy up
            // once per run of keys.
            let mut current: Option<(&str, &policy::Policy)> = None;
            let results = answers
                .into_iter()
                .zip(&request.items)
                .map(|(a, item)| {
                    let ns = policy::namespace(item.key);
                    self.record_check(
                        &mut recorder,
                        item.key,
                        ns,
                        item.version,
                        item.age_ms,
                        item.served,
                        &a,
                        &streams,
                    );
                    let p = match current {
                        Some((n, p)) if n == ns => p,
                        _ => {
                            let p = policies.for_namespace(ns);
                            current = Some((ns, p));
                            p
                        }
                    };
                    result(a, policy::decide(p, &a, item.age_ms), p.check_sample_rate)
                })
                .collect();
            (results, seq)
        } else {
            (vec![UNKNOWN; request.items.len()], self.store.seq())
        };
        Ok(pb::CheckBatchResponse {
            results,
            seq,
            epoch: self.store.epoch(),
        })
    }

    async fn lease_inner(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        self.limits.key(|| "key".to_owned(), &request.key)?;
        if let Some(who) = &who {
            who.require_key(Scope::Fill, &request.key)?;
        }
        self.wait_for(request.min_seq).await?;
        let epoch = self.store.epoch();
        let response = match self.store.lease(&request.key) {
            LeaseOutcome::Granted { token, seq, ttl_ms } => pb::LeaseResponse {
                granted: true,
                token,
                seq,
                ttl_ms,
                epoch,
                ..Default::default()
            },
            LeaseOutcome::InFlight { expires_in_ms } => pb::LeaseResponse {
                granted: false,
                ttl_ms: expires_in_ms,
                version: self.store.check(&request.key, 0, 0).0.version,
                // Fills usually land well before the lease runs out.
                retry_after_ms: expires_in_ms.clamp(1, 50),
                epoch,
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn purge_inner(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        let spec = self.limits.purge(&request)?;
        let client_id = crate::auth::client_id(who.as_ref(), request.client_id.clone());
        if let Some(who) = &who {
            who.require_prefix(Scope::Purge, &spec.prefix)?;
            if !spec.dry_run {
                who.admit_fanout().map_err(|e| self.quota(e))?;
            }
        }
        let outcome = if spec.dry_run {
            self.store.purge(&spec, &client_id)?
        } else {
            self.rate_limited(|| {
                let outcome = self.store.purge(&spec, &client_id)?;
                Ok((outcome, outcome.applied))
            })?
        };
        if let (Some(who), true) = (&who, outcome.applied) {
            who.charge_fanout(outcome.affected);
        }
        if outcome.applied {
            self.store.wait_durable(outcome.seq).await;
        }
        tracing::info!(
            prefix = %spec.prefix,
            hard = spec.hard,
            dry_run = spec.dry_run,
            affected = outcome.affected,
            applied = outcome.applied,
            "purge"
        );
        Ok(Response::new(pb::PurgeResponse {
            matched: outcome.matched,
            affected: outcome.affected,
            subscribers: outcome.subscribers,
            notices: outcome.notices,
            seq: outcome.seq,
            applied: outcome.applied,
            epoch: self.store.epoch(),
        }))
    }

    async fn get_policy_inner(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::NamespacePolicy>, Status> {
        let who = caller(&request);
        let namespace = request.into_inner().namespace;
        self.limits.namespace("namespace", &namespace)?;
        require_admin(who.as_deref(), &namespace)?;
        Ok(Response::new(self.named_policy(&namespace)))
    }

    async fn set_policy_inner(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::NamespacePolicy>, Status> {
        let who = caller(&request);
        let request = request.into_inner();
        self.limits.namespace("namespace", &request.namespace)?;
        require_admin(who.as_deref(), &request.namespace)?;
        let policy = validate::policy(
            request
                .policy
                .as_ref()
                .ok_or_else(|| Error::invalid("policy must be set"))?,
        )?;
        let namespace = (!request.namespace.is_empty()).then_some(request.namespace.as_str());
        let seq = self.store.set_policy(namespace, policy)?;
        self.store.wait_durable(seq).await;
        Ok(Response::new(self.named_policy(&request.namespace)))
    }

    async fn list_policies_inner(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        // A principal sees the policies of the namespaces it administers,
        // and the default policy when it administers every namespace.
        let who = caller(&request);
        if let Some(who) = &who {
            if !who.allows_somewhere(Scope::Admin) {
                return Err(Status::permission_denied(format!(
                    "principal {:?} lacks scope \"admin\" in any namespace",
                    who.name
                )));
            }
        }
        let sees = |ns: &str| who.as_ref().is_none_or(|w| w.allows(Scope::Admin, ns));
        let policies = self.store.policies();
        let mut list = Vec::new();
        if who
            .as_ref()
            .is_none_or(|w| w.allows_everywhere(Scope::Admin))
        {
            list.push(pb::NamespacePolicy {
                namespace: String::new(),
                policy: Some(validate::policy_to_pb(&policies.default)),
                is_default: true,
            });
        }
        list.extend(
            policies
                .namespaces
                .iter()
                .filter(|(ns, _)| sees(ns))
                .map(|(ns, p)| pb::NamespacePolicy {
                    namespace: ns.clone(),
                    policy: Some(validate::policy_to_pb(p)),
                    is_default: false,
                }),
        );
        Ok(Response::new(pb::ListPoliciesResponse { policies: list }))
    }

    async fn delete_policy_inner(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let who = caller(&request);
        let namespace = request.into_inner().namespace;
        require_admin(who.as_deref(), &namespace)?;
        if namespace.is_empty() {
            return Err(Error::invalid(
                "namespace must not be empty: the default policy cannot be deleted, set it instead",
            )
            .into());
        }
        self.limits.namespace("namespace", &namespace)?;
        let Some(seq) = self.store.delete_policy(&namespace)? else {
            return Err(Status::not_found(format!(
                "namespace {namespace:?} has no policy of its own; it uses the default"
            )));
        };
        self.store.wait_durable(seq).await;
        Ok(Response::new(pb::DeletePolicyResponse {}))
    }

    async fn inspect_inner(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let who = caller(&request);
        let key = request.into_inner().key;
        self.limits.key(|| "key".to_owned(), &key)?;
        if let Some(who) = &who {
            who.require_key(Scope::Check, &key)?;
        }
        let mut info = self.store.inspect(&key).ok_or(Error::NotFound(key))?;
        if let Some(who) = &who {
            // Dependencies name keys: show only those the caller may
            // check. (`dependents` is a count and names none.)
            info.dependencies
                .retain(|k| who.allows_key(Scope::Check, k));
        }
        Ok(Response::new(pb::InspectResponse {
            key: info.key,
            version: info.version,
            last_change_seq: info.last_change_seq,
            last_change_unix_ms: info.last_change_unix_ms,
            event_time_unix_ms: info.event_time_unix_ms,
            critical: info.critical,
            dependencies: info.dependencies,
            dependents: info.dependents,
            registered: info.registered,
            ttl_left_ms: info.ttl_left_ms,
            external_version: info.external_version,
        }))
    }

    async fn stats_inner(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        if let Some(who) = caller(&request) {
            who.require_everywhere(Scope::Admin, "Stats")?;
        }
        let s = self.store.stats();
        let hub = self.store.hub();
        let (history_notices, history_floor_seq) = hub.history_stats();
        let subscribers = hub
            .subscriber_stats()
            .into_iter()
            .map(|s| pb::SubscriberStats {
                client_id: s.client_id,
                acked_seq: s.acked_seq,
                lag: s.lag,
                queued: s.queued,
                tracked_keys: s.tracked_keys,
                prefixes: s.prefixes,
                overflows: s.overflows,
                ack_delay_ms: s.ack_delay_ms,
            })
            .collect();
        Ok(Response::new(pb::StatsResponse {
            keys: s.keys,
            edges: s.edges,
            shards: s.shards,
            seq: s.seq,
            epoch: s.epoch,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            expired: s.expired,
            oversized_publishes: s.oversized_publishes,
            subscribers,
            history_notices,
            history_floor_seq,
            leases_granted: s.leases_granted,
            leases_contended: s.leases_contended,
            leases_held: s.leases_held,
            purges: s.purges,
            purged_keys: s.purged_keys,
        }))
    }
}
