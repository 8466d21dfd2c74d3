//! The gRPC handlers of `freshd.v1.Coordinator`: validate, call the store,
//! convert. Nothing else lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::pb::{self, coordinator_server::Coordinator};
use crate::store::{CheckAnswer, Freshness, Store};
use crate::validate::Limits;

/// The Coordinator service over a shared [`Store`].
pub struct CoordinatorService {
    store: Arc<Store>,
    limits: Limits,
    started: Instant,
}

impl CoordinatorService {
    /// A service answering from `store` under `limits`.
    pub fn new(store: Arc<Store>, limits: Limits) -> Self {
        Self {
            store,
            limits,
            started: Instant::now(),
        }
    }

    /// Whether a client's epoch (0: none given) matches the store's.
    fn same_epoch(&self, epoch: u64) -> bool {
        epoch == 0 || epoch == self.store.epoch()
    }
}

fn freshness(f: Freshness) -> pb::Freshness {
    match f {
        Freshness::Fresh => pb::Freshness::Fresh,
        Freshness::Stale => pb::Freshness::Stale,
        Freshness::Unknown => pb::Freshness::Unknown,
    }
}

fn result(a: CheckAnswer) -> pb::CheckResult {
    pb::CheckResult {
        freshness: freshness(a.freshness).into(),
        version: a.version,
        critical: a.critical,
    }
}

const UNKNOWN: pb::CheckResult = pb::CheckResult {
    freshness: pb::Freshness::Unknown as i32,
    version: 0,
    critical: false,
};

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.next().await.transpose()?;
        let rx = crate::watch::start(self.store.clone(), self.limits.clone(), first, inbound)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let request = request.into_inner();
        let client_id = request.client_id.clone();
        let changes = self.limits.publish(request)?;
        let outcome = self.store.publish_from(&changes, &client_id)?;
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

    async fn fill(
        &self,
        request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        let request = request.into_inner();
        if !self.same_epoch(request.epoch) {
            return Err(Error::EpochMismatch {
                got: request.epoch,
                current: self.store.epoch(),
            }
            .into());
        }
        let spec = self.limits.fill(request, self.store.config())?;
        let outcome = self.store.fill(&spec)?;
        Ok(Response::new(pb::FillResponse {
            version: outcome.version,
            seq: outcome.seq,
            epoch: self.store.epoch(),
            ttl_ms: outcome.ttl_ms,
        }))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let request = request.into_inner();
        self.limits.key(|| "key".to_owned(), &request.key)?;
        let (answer, seq) = if self.same_epoch(request.epoch) {
            let (answer, seq) = self.store.check(&request.key, request.version);
            (result(answer), seq)
        } else {
            (UNKNOWN, self.store.seq())
        };
        Ok(Response::new(pb::CheckResponse {
            freshness: answer.freshness,
            version: answer.version,
            critical: answer.critical,
            seq,
            epoch: self.store.epoch(),
        }))
    }

    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let request = request.into_inner();
        self.limits.batch("items", request.items.len())?;
        for (i, item) in request.items.iter().enumerate() {
            self.limits.key(|| format!("items[{i}].key"), &item.key)?;
        }
        let (results, seq) = if self.same_epoch(request.epoch) {
            let (answers, seq) = self
                .store
                .check_batch(&request.items, |i| (i.key.as_str(), i.version));
            (answers.into_iter().map(result).collect(), seq)
        } else {
            (vec![UNKNOWN; request.items.len()], self.store.seq())
        };
        Ok(Response::new(pb::CheckBatchResponse {
            results,
            seq,
            epoch: self.store.epoch(),
        }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let key = request.into_inner().key;
        self.limits.key(|| "key".to_owned(), &key)?;
        let info = self.store.inspect(&key).ok_or(Error::NotFound(key))?;
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

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
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
        }))
    }
}
