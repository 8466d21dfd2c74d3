// Package freshd is the Go client of freshd, a cache-coordination server.
//
// freshd holds a version per key and the dependency edges between keys;
// services keep the cached values wherever they like. A write publishes a
// change (freshd bumps the key and every transitive dependent), a cache hit
// is version-checked (the answer follows the namespace's freshness policy:
// serve, revalidate in the background, or refetch), and a Watch stream pushes
// invalidation notices for tracked keys and prefixes, resumable with a token.
//
// [Client] has one method per RPC of the freshd.v1.Coordinator service,
// taking a [context.Context] first and returning the response messages of the
// generated package [github.com/freshd/freshd/clients/go/freshdv1] (aliased
// here, so most programs need only this package). Failed calls return an
// [*Error] carrying the gRPC status code; compare it with [errors.Is] against
// [ErrNotFound], [ErrFillRaced], [ErrUnauthenticated] and the other sentinels.
//
// [Client.Watch] opens a [WatchStream]; [NearCache] is an in-process cache
// kept right by freshd: leases and fills on a miss, version checks on a hit,
// and one Watch stream that drops copies as soon as they change.
//
// The generated code in freshdv1 comes from proto/freshd/v1/coordinator.proto
// by ./generate.sh.
package freshd

//go:generate ./generate.sh
