package dev.freshd.client;

import freshd.v1.CoordinatorGrpc;
import freshd.v1.CoordinatorOuterClass;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ClientInterceptors;
import io.grpc.Deadline;
import io.grpc.ForwardingClientCall;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.TimeUnit;
import java.util.function.Function;

/**
 * A connection to one freshd server: one blocking method per RPC of {@code freshd.v1.Coordinator},
 * immutable results, and {@link FreshdException}s that carry the gRPC status code.
 *
 * <pre>{@code
 * try (FreshdClient client = FreshdClient.builder("127.0.0.1:50051").build()) {
 *     long seq = client.check("feed:user:4821", 0).seq();
 *     FillResult fill = client.fill("feed:user:4821", List.of("posts:author:77"),
 *             FillOptions.builder().ttlMs(60_000).observedSeq(seq).build());
 *     client.publish("posts:author:77");
 * }
 * }</pre>
 *
 * <p>Thread-safe. {@link #withTimeout} and {@link #withDeadline} give views that share the
 * connection and differ only in the deadline of their calls.
 */
public final class FreshdClient implements AutoCloseable {
    /** The timeout of every unary call unless the builder says otherwise. */
    public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(10);

    private final String target;
    private final String clientId;
    private final Duration timeout;
    private final Deadline deadline;
    private final boolean tls;
    private final ManagedChannel managed;
    private final Channel channel;
    private final boolean owner;

    private FreshdClient(
            String target, String clientId, Duration timeout, Deadline deadline, boolean tls,
            ManagedChannel managed, Channel channel, boolean owner) {
        this.target = target;
        this.clientId = clientId;
        this.timeout = timeout;
        this.deadline = deadline;
        this.tls = tls;
        this.managed = managed;
        this.channel = channel;
        this.owner = owner;
    }

    /**
     * A builder for a client of the server at {@code target}: {@code host:port},
     * {@code http://host:port}, or {@code https://host:port} for TLS.
     *
     * @param target the server's address
     * @return a new builder
     */
    public static Builder builder(String target) {
        return new Builder(target);
    }

    // ---------------------------------------------------------------- views

    /**
     * A view of this client whose unary calls time out after {@code timeout}; it shares the
     * connection, and closing it closes nothing.
     *
     * @param timeout the per-call timeout; null: none
     * @return the view
     */
    public FreshdClient withTimeout(Duration timeout) {
        return new FreshdClient(target, clientId, timeout, null, tls, managed, channel, false);
    }

    /**
     * A view of this client whose unary calls all end at one deadline; it shares the connection.
     *
     * @param deadline the deadline
     * @return the view
     */
    public FreshdClient withDeadline(Deadline deadline) {
        return new FreshdClient(
                target, clientId, null, Objects.requireNonNull(deadline, "deadline"), tls, managed, channel, false);
    }

    /**
     * The address this client connects to, without a scheme.
     *
     * @return {@code host:port}
     */
    public String target() {
        return target;
    }

    /**
     * The client id sent with calls that do not name one (may be empty).
     *
     * @return the id
     */
    public String clientId() {
        return clientId;
    }

    /**
     * The per-call timeout.
     *
     * @return the timeout, or null when calls have none (or a fixed deadline)
     */
    public Duration timeout() {
        return timeout;
    }

    /**
     * Whether the connection uses TLS.
     *
     * @return true for TLS
     */
    public boolean isTls() {
        return tls;
    }

    /**
     * The channel calls go through (with the bearer token when one is set), for calls this client
     * has no method for.
     *
     * @return the channel
     */
    public Channel channel() {
        return channel;
    }

    /**
     * Lets the channel reconnect at once instead of waiting out its backoff (after a server
     * restart, say).
     */
    public void resetConnectBackoff() {
        managed.resetConnectBackoff();
    }

    /** Closes the connection (for the client the builder made; views close nothing). */
    @Override
    public void close() {
        if (!owner) {
            return;
        }
        managed.shutdown();
        try {
            if (!managed.awaitTermination(5, TimeUnit.SECONDS)) {
                managed.shutdownNow();
            }
        } catch (InterruptedException e) {
            managed.shutdownNow();
            Thread.currentThread().interrupt();
        }
    }

    // ----------------------------------------------------------------- calls

    private CoordinatorGrpc.CoordinatorBlockingStub stub() {
        CoordinatorGrpc.CoordinatorBlockingStub stub = CoordinatorGrpc.newBlockingStub(channel);
        if (deadline != null) {
            return stub.withDeadline(deadline);
        }
        if (timeout != null && !timeout.isZero() && !timeout.isNegative()) {
            return stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
        }
        return stub;
    }

    private <T> T call(String method, Function<CoordinatorGrpc.CoordinatorBlockingStub, T> fn) {
        try {
            return fn.apply(stub());
        } catch (StatusRuntimeException e) {
            throw FreshdException.from(e, method);
        }
    }

    private String id(String given) {
        return given == null ? clientId : given;
    }

    /**
     * Publishes changes: each changed key and every transitive dependent is bumped once.
     *
     * @param changes at least one change
     * @return the seq, the epoch and one result per change
     * @throws FreshdException.InvalidArgument when {@code changes} is empty or too long, or a key is bad
     */
    public PublishResult publish(List<Change> changes) {
        return publish(changes, null);
    }

    /**
     * Publishes changes under a client id (Watch streams of that id with no-loop get no notices of it).
     *
     * @param changes at least one change
     * @param clientId who publishes; null: this client's id
     * @return the seq, the epoch and one result per change
     */
    public PublishResult publish(List<Change> changes, String clientId) {
        CoordinatorOuterClass.PublishRequest.Builder request = CoordinatorOuterClass.PublishRequest.newBuilder()
                .setClientId(id(clientId));
        for (Change change : changes) {
            request.addChanges(change.toProto());
        }
        return PublishResult.fromProto(call("Publish", s -> s.publish(request.build())));
    }

    /**
     * Publishes plain changes of keys.
     *
     * @param keys the keys that changed
     * @return the seq, the epoch and one result per key
     */
    public PublishResult publish(String... keys) {
        return publish(Arrays.stream(keys).map(Change::of).toList());
    }

    /**
     * Registers a cached key with its dependencies, with the server's default TTL and no observed seq.
     *
     * @param key the key the caller cached
     * @param dependencies keys whose change must invalidate it
     * @return the version to store beside the value
     */
    public FillResult fill(String key, Collection<String> dependencies) {
        return fill(key, dependencies, FillOptions.DEFAULTS);
    }

    /**
     * Registers a cached key with its dependencies.
     *
     * @param key the key the caller cached
     * @param dependencies keys whose change must invalidate it
     * @param options TTL, observed seq, epoch, lease token, client id
     * @return the version to store beside the value
     * @throws FreshdException.FillRaced when the key or a dependency changed after the observed seq
     * @throws FreshdException.LeaseLost when the lease token is not held
     */
    public FillResult fill(String key, Collection<String> dependencies, FillOptions options) {
        CoordinatorOuterClass.FillRequest request = CoordinatorOuterClass.FillRequest.newBuilder()
                .setKey(key)
                .addAllDependencies(dependencies)
                .setTtlMs(options.ttlMs())
                .setObservedSeq(options.observedSeq())
                .setEpoch(options.epoch())
                .setLeaseToken(options.leaseToken())
                .setClientId(id(options.clientId()))
                .build();
        return FillResult.fromProto(call("Fill", s -> s.fill(request)));
    }

    /**
     * Is a cached copy still right? With version 0 it asks only for the current seq.
     *
     * @param key the key
     * @param version the version stored beside the copy
     * @return the fact and the policy's decision
     */
    public CheckResult check(String key, long version) {
        return check(key, version, CheckOptions.DEFAULTS);
    }

    /**
     * Is a cached copy still right?
     *
     * @param key the key
     * @param version the version stored beside the copy
     * @param options age, epoch, min seq, endpoint, served, client id
     * @return the fact and the policy's decision
     * @throws FreshdException.Unavailable when {@code minSeq} was not applied in time
     */
    public CheckResult check(String key, long version, CheckOptions options) {
        CoordinatorOuterClass.CheckRequest request = CoordinatorOuterClass.CheckRequest.newBuilder()
                .setKey(key)
                .setVersion(version)
                .setAgeMs(options.ageMs())
                .setEpoch(options.epoch())
                .setMinSeq(options.minSeq())
                .setEndpoint(options.endpoint() == null ? "" : options.endpoint())
                .setServed(options.served())
                .setClientId(id(options.clientId()))
                .build();
        return CheckResult.fromProto(call("Check", s -> s.check(request)));
    }

    /**
     * Checks many copies, answered from one consistent state.
     *
     * @param items the copies
     * @return one result per item, in order
     */
    public CheckBatchResult checkBatch(List<CheckItem> items) {
        return checkBatch(items, CheckBatchOptions.DEFAULTS);
    }

    /**
     * Checks many copies, answered from one consistent state.
     *
     * @param items the copies
     * @param options epoch, min seq, endpoint, client id
     * @return one result per item, in order
     */
    public CheckBatchResult checkBatch(List<CheckItem> items, CheckBatchOptions options) {
        CoordinatorOuterClass.CheckBatchRequest.Builder request = CoordinatorOuterClass.CheckBatchRequest.newBuilder()
                .setEpoch(options.epoch())
                .setMinSeq(options.minSeq())
                .setEndpoint(options.endpoint() == null ? "" : options.endpoint())
                .setClientId(id(options.clientId()));
        for (CheckItem item : items) {
            request.addItems(item.toProto());
        }
        return CheckBatchResult.fromProto(call("CheckBatch", s -> s.checkBatch(request.build())));
    }

    /**
     * Everything freshd holds for one key.
     *
     * @param key the key
     * @return what the server holds
     * @throws FreshdException.NotFound when it holds nothing for the key
     */
    public KeyInfo inspect(String key) {
        CoordinatorOuterClass.InspectRequest request = CoordinatorOuterClass.InspectRequest.newBuilder().setKey(key).build();
        return KeyInfo.fromProto(call("Inspect", s -> s.inspect(request)));
    }

    /**
     * Server-wide counters.
     *
     * @return the counters
     */
    public Stats stats() {
        return Stats.fromProto(call("Stats", s -> s.stats(CoordinatorOuterClass.StatsRequest.getDefaultInstance())));
    }

    /**
     * Asks for the fill lease of a key before reading the origin on a miss.
     *
     * @param key the key
     * @return granted with a token, or the current version and a suggested wait
     */
    public LeaseResult lease(String key) {
        return lease(key, 0);
    }

    /**
     * Asks for the fill lease of a key, after the server applied {@code minSeq}.
     *
     * @param key the key
     * @param minSeq read your writes; 0: none
     * @return granted with a token, or the current version and a suggested wait
     */
    public LeaseResult lease(String key, long minSeq) {
        CoordinatorOuterClass.LeaseRequest request =
                CoordinatorOuterClass.LeaseRequest.newBuilder().setKey(key).setMinSeq(minSeq).build();
        return LeaseResult.fromProto(call("Lease", s -> s.lease(request)));
    }

    /**
     * Soft-purges every key under a prefix.
     *
     * @param prefix the prefix ("ns:" for a namespace, "" for every key)
     * @return what the purge did
     */
    public PurgeResult purge(String prefix) {
        return purge(prefix, PurgeOptions.DEFAULTS);
    }

    /**
     * Invalidates every key under a prefix, and their dependents.
     *
     * @param prefix the prefix
     * @param options dry run, hard, confirm, jitter, client id
     * @return what the purge did (or would do)
     * @throws FreshdException.FailedPrecondition over {@code max_purge_keys} without confirm
     * @throws FreshdException.ResourceExhausted over {@code purges_per_minute}
     */
    public PurgeResult purge(String prefix, PurgeOptions options) {
        CoordinatorOuterClass.PurgeRequest request = CoordinatorOuterClass.PurgeRequest.newBuilder()
                .setPrefix(prefix)
                .setDryRun(options.dryRun())
                .setHard(options.hard())
                .setConfirm(options.confirm())
                .setJitterMs(options.jitterMs())
                .setClientId(id(options.clientId()))
                .build();
        return PurgeResult.fromProto(call("Purge", s -> s.purge(request)));
    }

    /**
     * The policy in force for a namespace.
     *
     * @param namespace the namespace; "" for the default
     * @return the policy, {@code isDefault} when the namespace has none of its own
     */
    public NamespacePolicy getPolicy(String namespace) {
        CoordinatorOuterClass.GetPolicyRequest request =
                CoordinatorOuterClass.GetPolicyRequest.newBuilder().setNamespace(namespace).build();
        return NamespacePolicy.fromProto(call("GetPolicy", s -> s.getPolicy(request)));
    }

    /**
     * Sets a namespace's policy.
     *
     * @param namespace the namespace; "" for the default
     * @param policy the policy
     * @return the policy as stored
     */
    public NamespacePolicy setPolicy(String namespace, Policy policy) {
        CoordinatorOuterClass.SetPolicyRequest request = CoordinatorOuterClass.SetPolicyRequest.newBuilder()
                .setNamespace(namespace)
                .setPolicy(policy.toProto())
                .build();
        return NamespacePolicy.fromProto(call("SetPolicy", s -> s.setPolicy(request)));
    }

    /**
     * Every policy: the default first, then namespaces in order.
     *
     * @return the policies
     */
    public List<NamespacePolicy> listPolicies() {
        CoordinatorOuterClass.ListPoliciesResponse response = call(
                "ListPolicies", s -> s.listPolicies(CoordinatorOuterClass.ListPoliciesRequest.getDefaultInstance()));
        return response.getPoliciesList().stream().map(NamespacePolicy::fromProto).toList();
    }

    /**
     * Removes a namespace's policy; the namespace falls back to the default.
     *
     * @param namespace the namespace
     * @throws FreshdException.NotFound when it has no policy of its own
     * @throws FreshdException.InvalidArgument for the default
     */
    public void deletePolicy(String namespace) {
        CoordinatorOuterClass.DeletePolicyRequest request =
                CoordinatorOuterClass.DeletePolicyRequest.newBuilder().setNamespace(namespace).build();
        call("DeletePolicy", s -> s.deletePolicy(request));
    }

    /**
     * Opens the invalidation stream and waits for its {@code started} message.
     *
     * @param options the start fields and the buffer bound
     * @return the open stream
     * @throws FreshdException when the server refuses the start (a bad key, a limit), or no
     *     {@code started} arrives in time (DEADLINE_EXCEEDED)
     */
    public WatchStream watch(WatchOptions options) {
        Duration startTimeout = options.startTimeout() != null ? options.startTimeout()
                : timeout != null ? timeout : DEFAULT_TIMEOUT;
        return new WatchStream(channel, options, id(options.clientId()), startTimeout);
    }

    /**
     * Opens a Watch stream with the default options and this client's id.
     *
     * @return the open stream
     */
    public WatchStream watch() {
        return watch(WatchOptions.builder().build());
    }

    // --------------------------------------------------------------- builder

    /** Builds a {@link FreshdClient}: target, client id, timeout, token and TLS. */
    public static final class Builder {
        private final String target;
        private String clientId = "";
        private Duration timeout = DEFAULT_TIMEOUT;
        private String token;
        private boolean tls;
        private byte[] caPem;
        private byte[] certPem;
        private byte[] keyPem;
        private String serverName;
        private final List<ClientInterceptor> interceptors = new ArrayList<>();

        private Builder(String target) {
            this.target = Objects.requireNonNull(target, "target");
        }

        /**
         * The id sent with publishes, fills, checks, purges and Watch streams that do not name one.
         *
         * @param value the id
         * @return this builder
         */
        public Builder clientId(String value) {
            clientId = Objects.requireNonNull(value, "clientId");
            return this;
        }

        /**
         * The timeout of every unary call (default 10 s); null or zero: none.
         *
         * @param value the timeout
         * @return this builder
         */
        public Builder timeout(Duration value) {
            timeout = value;
            return this;
        }

        /**
         * A bearer token, sent as {@code authorization: Bearer <token>} with every call and Watch stream.
         *
         * @param value the token ({@code freshd --new-token} makes one)
         * @return this builder
         */
        public Builder token(String value) {
            token = value;
            return this;
        }

        /**
         * TLS with the system's roots (implied by an {@code https://} target or any TLS setting).
         *
         * @param value whether to use TLS
         * @return this builder
         */
        public Builder tls(boolean value) {
            tls = value;
            return this;
        }

        /**
         * The CA certificates (PEM file) the server's certificate must chain to.
         *
         * @param pemFile the file
         * @return this builder
         */
        public Builder tlsCaFile(Path pemFile) {
            return tlsCa(read(pemFile, "the CA file"));
        }

        /**
         * The CA certificates (PEM) the server's certificate must chain to.
         *
         * @param pem the PEM content
         * @return this builder
         */
        public Builder tlsCa(byte[] pem) {
            caPem = checkPem(pem, "the CA");
            tls = true;
            return this;
        }

        /**
         * A client certificate and its key (PEM files), for mutual TLS.
         *
         * @param certificateChain the certificate chain
         * @param privateKey the private key (PKCS#8)
         * @return this builder
         */
        public Builder tlsClientCertFiles(Path certificateChain, Path privateKey) {
            return tlsClientCert(read(certificateChain, "the client certificate"), read(privateKey, "the client key"));
        }

        /**
         * A client certificate and its key (PEM), for mutual TLS.
         *
         * @param certificateChain the certificate chain
         * @param privateKey the private key (PKCS#8)
         * @return this builder
         */
        public Builder tlsClientCert(byte[] certificateChain, byte[] privateKey) {
            certPem = checkPem(certificateChain, "the client certificate");
            keyPem = checkPem(privateKey, "the client key");
            tls = true;
            return this;
        }

        /**
         * The name the server's certificate must carry, when it is not the target's host.
         *
         * @param value the name
         * @return this builder
         */
        public Builder serverName(String value) {
            serverName = value;
            tls = true;
            return this;
        }

        /**
         * Interceptors for every call and Watch stream (metrics, tracing, ...); the first given
         * runs first. The bearer token is added after them.
         *
         * @param values the interceptors
         * @return this builder
         */
        public Builder intercept(ClientInterceptor... values) {
            interceptors.addAll(List.of(values));
            return this;
        }

        private static byte[] read(Path file, String what) {
            try {
                return Files.readAllBytes(file);
            } catch (IOException e) {
                throw new UncheckedIOException(what + ": cannot read " + file + ": " + e.getMessage(), e);
            }
        }

        private static byte[] checkPem(byte[] pem, String what) {
            if (!new String(pem, StandardCharsets.US_ASCII).contains("-----BEGIN")) {
                throw new IllegalArgumentException(what + " holds no PEM block");
            }
            return pem.clone();
        }

        /**
         * Connects (lazily: the first call opens the connection).
         *
         * @return the client
         * @throws IllegalArgumentException for TLS settings with a plaintext target, or a token that
         *     cannot be sent
         */
        public FreshdClient build() {
            String address = target;
            boolean useTls = tls;
            boolean plaintextScheme = false;
            for (String scheme : List.of("http://", "grpc://", "https://")) {
                if (address.startsWith(scheme)) {
                    useTls |= scheme.equals("https://");
                    plaintextScheme = !scheme.equals("https://");
                    address = address.substring(scheme.length());
                    break;
                }
            }
            while (address.endsWith("/")) {
                address = address.substring(0, address.length() - 1);
            }
            if (plaintextScheme && useTls) {
                throw new IllegalArgumentException(
                        "TLS settings are given for " + target + ", a plaintext target: write https:// or host:port");
            }
            ClientInterceptor bearer = token == null ? null : new BearerToken(token);
            ChannelCredentials credentials;
            if (useTls) {
                TlsChannelCredentials.Builder b = TlsChannelCredentials.newBuilder();
                try {
                    if (caPem != null) {
                        b.trustManager(new ByteArrayInputStream(caPem));
                    }
                    if (certPem != null) {
                        b.keyManager(new ByteArrayInputStream(certPem), new ByteArrayInputStream(keyPem));
                    }
                } catch (IOException e) {
                    throw new IllegalArgumentException("bad TLS material: " + e.getMessage(), e);
                }
                credentials = b.build();
            } else {
                credentials = InsecureChannelCredentials.create();
            }
            ManagedChannelBuilder<?> builder = Grpc.newChannelBuilder(address, credentials)
                    .keepAliveTime(30, TimeUnit.SECONDS)
                    .keepAliveTimeout(10, TimeUnit.SECONDS);
            if (serverName != null) {
                builder.overrideAuthority(serverName);
            }
            ManagedChannel managed = builder.build();
            Channel channel = bearer == null ? managed : ClientInterceptors.intercept(managed, bearer);
            // intercept() runs the last in the list first: reverse, so the first given runs first.
            List<ClientInterceptor> ordered = new ArrayList<>(interceptors);
            Collections.reverse(ordered);
            channel = ClientInterceptors.intercept(channel, ordered);
            return new FreshdClient(address, clientId, timeout, null, useTls, managed, channel, true);
        }
    }

    /** Adds {@code authorization: Bearer <token>} to every call, Watch streams included. */
    private static final class BearerToken implements ClientInterceptor {
        private static final Metadata.Key<String> AUTHORIZATION =
                Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
        private final String value;

        BearerToken(String token) {
            String t = token.strip();
            if (t.isEmpty()) {
                throw new IllegalArgumentException("token: the token is empty");
            }
            for (int i = 0; i < t.length(); i++) {
                char c = t.charAt(i);
                if (c < 33 || c > 126) {
                    throw new IllegalArgumentException(
                            "token: the token must be visible ASCII without spaces (as `freshd --new-token` prints it)");
                }
            }
            this.value = "Bearer " + t;
        }

        @Override
        public <Q, R> ClientCall<Q, R> interceptCall(MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
            return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
                @Override
                public void start(Listener<R> listener, Metadata headers) {
                    headers.discardAll(AUTHORIZATION);
                    headers.put(AUTHORIZATION, value);
                    super.start(listener, headers);
                }
            };
        }

        @Override
        public String toString() {
            return "BearerToken(<redacted>)";
        }
    }
}
