package freshd

import pb "github.com/freshd/freshd/clients/go/freshdv1"

// Requests and responses of the Coordinator service, as generated from
// proto/freshd/v1/coordinator.proto; the proto documents every field.
type (
	// Change is one change to publish.
	Change = pb.Change
	// PublishRequest is the request of [Client.Publish].
	PublishRequest = pb.PublishRequest
	// PublishResponse is the answer of [Client.Publish].
	PublishResponse = pb.PublishResponse
	// ChangeResult is the result of one [Change] of a publish.
	ChangeResult = pb.ChangeResult
	// FillRequest is the request of [Client.Fill].
	FillRequest = pb.FillRequest
	// FillResponse is the answer of [Client.Fill].
	FillResponse = pb.FillResponse
	// CheckRequest is the request of [Client.Check].
	CheckRequest = pb.CheckRequest
	// CheckResponse is the answer of [Client.Check].
	CheckResponse = pb.CheckResponse
	// CheckItem is one copy to check in a [CheckBatchRequest].
	CheckItem = pb.CheckItem
	// CheckBatchRequest is the request of [Client.CheckBatch].
	CheckBatchRequest = pb.CheckBatchRequest
	// CheckBatchResponse is the answer of [Client.CheckBatch].
	CheckBatchResponse = pb.CheckBatchResponse
	// CheckResult is the answer for one [CheckItem].
	CheckResult = pb.CheckResult
	// InspectResponse is the answer of [Client.Inspect].
	InspectResponse = pb.InspectResponse
	// StatsResponse is the answer of [Client.Stats].
	StatsResponse = pb.StatsResponse
	// SubscriberStats describes one open Watch stream in [StatsResponse].
	SubscriberStats = pb.SubscriberStats
	// LeaseRequest is the request of [Client.Lease].
	LeaseRequest = pb.LeaseRequest
	// LeaseResponse is the answer of [Client.Lease].
	LeaseResponse = pb.LeaseResponse
	// PurgeRequest is the request of [Client.Purge].
	PurgeRequest = pb.PurgeRequest
	// PurgeResponse is the answer of [Client.Purge].
	PurgeResponse = pb.PurgeResponse
	// FreshnessPolicy is a namespace's freshness policy.
	FreshnessPolicy = pb.FreshnessPolicy
	// NamespacePolicy is the policy in force for a namespace.
	NamespacePolicy = pb.NamespacePolicy
	// WatchStart opens a Watch stream: see [Client.Watch].
	WatchStart = pb.WatchStart
	// ResumeToken is where a Watch stream stands in the server's history.
	ResumeToken = pb.ResumeToken
	// WatchStarted is the first message of a Watch stream.
	WatchStarted = pb.WatchStarted
	// WatchEvent is one message read from a Watch stream: its Response is
	// one of started, notices, progress, reset or refused.
	WatchEvent = pb.WatchResponse
	// Notice says that one key changed.
	Notice = pb.Notice
	// NoticeBatch is a batch of notices, in seq order.
	NoticeBatch = pb.NoticeBatch
	// Progress is a watermark: every matching notice up to its seq was sent.
	Progress = pb.Progress
	// Reset says that keys under a prefix may have changed.
	Reset = pb.Reset
	// Refused is a track or subscribe the server refused, in band.
	Refused = pb.Refused
	// Freshness is whether a cached copy is the current version.
	Freshness = pb.Freshness
	// Decision is what a cache should do with its copy.
	Decision = pb.Decision
	// ResetReason is why a [Reset] was sent.
	ResetReason = pb.ResetReason
	// ResumeOutcome is how a Watch stream started.
	ResumeOutcome = pb.ResumeOutcome
)

// Values of [Freshness], [Decision], [ResetReason] and [ResumeOutcome].
const (
	FreshnessFresh   = pb.Freshness_FRESHNESS_FRESH
	FreshnessStale   = pb.Freshness_FRESHNESS_STALE
	FreshnessUnknown = pb.Freshness_FRESHNESS_UNKNOWN

	DecisionFresh      = pb.Decision_DECISION_FRESH
	DecisionRevalidate = pb.Decision_DECISION_REVALIDATE
	DecisionRefetch    = pb.Decision_DECISION_REFETCH
	DecisionUnknown    = pb.Decision_DECISION_UNKNOWN

	ResetHistoryCompacted = pb.ResetReason_RESET_REASON_HISTORY_COMPACTED
	ResetNewEpoch         = pb.ResetReason_RESET_REASON_NEW_EPOCH
	ResetSlowConsumer     = pb.ResetReason_RESET_REASON_SLOW_CONSUMER

	ResumeNew         = pb.ResumeOutcome_RESUME_OUTCOME_NEW
	ResumeFromHistory = pb.ResumeOutcome_RESUME_OUTCOME_FROM_HISTORY
	ResumeRepaired    = pb.ResumeOutcome_RESUME_OUTCOME_REPAIRED
)

// Keys returns one [Change] per key, none of them critical: the changes of a
// plain publish.
func Keys(keys ...string) []*Change {
	changes := make([]*Change, len(keys))
	for i, k := range keys {
		changes[i] = &Change{Key: k}
	}
	return changes
}
