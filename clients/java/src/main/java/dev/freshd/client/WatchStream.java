package dev.freshd.client;

import freshd.v1.CoordinatorGrpc;
import freshd.v1.CoordinatorOuterClass;
import freshd.v1.CoordinatorOuterClass.WatchRequest;
import freshd.v1.CoordinatorOuterClass.WatchResponse;
import io.grpc.Channel;
import io.grpc.Status;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.Optional;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * One Watch stream: send filter changes, acknowledgements and progress requests; receive
 * {@link WatchEvent}s (notice batches, progress, resets, refusals).
 *
 * <p>Events wait in a buffer of at most {@link WatchOptions#maxBuffered()} until {@link #poll},
 * {@link #take} or iteration takes them: an application that falls behind stops the reading
 * there, the stream's flow-control windows fill, and the server treats it as a slow consumer
 * (catching it up from its history, or with a {@link Reset}), so a stalled reader costs a bounded
 * buffer. Sends are thread-safe; receive from one thread at a time.
 *
 * <p>{@link #close()} cancels the call at once; {@link #closeSend()} closes the client side, after
 * which the server ends the stream.
 */
public final class WatchStream implements AutoCloseable, Iterable<WatchEvent> {
    private static final Object END = new Object();

    private final LinkedBlockingQueue<Object> events = new LinkedBlockingQueue<>();
    private final CountDownLatch terminated = new CountDownLatch(1);
    private final Object sending = new Object();
    private final io.grpc.stub.StreamObserver<WatchRequest> requests;
    private volatile ClientCallStreamObserver<WatchRequest> call;
    private final WatchStarted started;
    private long sent = 1;
    private boolean sendClosed;
    private RuntimeException ended;
    private volatile ResumeToken token;

    WatchStream(Channel channel, WatchOptions options, String clientId, Duration startTimeout) {
        int initial = options.maxBuffered();
        ClientResponseObserver<WatchRequest, WatchResponse> observer = new ClientResponseObserver<>() {
            @Override
            public void beforeStart(ClientCallStreamObserver<WatchRequest> stream) {
                call = stream;
                stream.disableAutoRequestWithInitial(initial);
            }

            @Override
            public void onNext(WatchResponse response) {
                WatchEvent event = convert(response);
                if (event != null) {
                    events.add(event);
                } else if (call != null) {
                    call.request(1); // nothing this client knows: let the next one in
                }
            }

            @Override
            public void onError(Throwable error) {
                Status status = Status.fromThrowable(error);
                events.add(status.getCode() == Status.Code.CANCELLED && isSendClosed()
                        ? END : FreshdException.from(error, "Watch"));
                terminated.countDown();
            }

            @Override
            public void onCompleted() {
                events.add(END);
                terminated.countDown();
            }
        };
        requests = CoordinatorGrpc.newStub(channel).watch(observer);
        CoordinatorOuterClass.WatchStart.Builder start = CoordinatorOuterClass.WatchStart.newBuilder()
                .setClientId(clientId)
                .setNoLoop(options.noLoop())
                .addAllTrack(options.track())
                .addAllSubscribe(options.subscribe())
                .setRefusalsInBand(options.refusalsInBand());
        if (options.resume() != null) {
            start.setResume(options.resume().toProto());
        }
        requests.onNext(WatchRequest.newBuilder().setStart(start).build());

        WatchEvent first;
        try {
            first = poll(startTimeout).orElse(null);
        } catch (StreamEndedException e) {
            throw FreshdException.of(Status.Code.UNKNOWN, "the stream ended before `started`", "Watch", null);
        } catch (FreshdException e) {
            cancel();
            throw e;
        }
        if (first == null) {
            cancel();
            throw FreshdException.of(Status.Code.DEADLINE_EXCEEDED, "no `started` within " + startTimeout, "Watch", null);
        }
        if (!(first instanceof WatchStarted s)) {
            cancel();
            throw FreshdException.of(Status.Code.UNKNOWN, "expected `started`, got " + first, "Watch", null);
        }
        started = s;
        token = new ResumeToken(s.epoch(), s.seq());
    }

    private static WatchEvent convert(WatchResponse response) {
        switch (response.getResponseCase()) {
            case STARTED: return WatchStarted.fromProto(response.getStarted());
            case NOTICES: return NoticeBatch.fromProto(response.getNotices());
            case PROGRESS: return Progress.fromProto(response.getProgress());
            case RESET: return Reset.fromProto(response.getReset());
            case REFUSED: return Refused.fromProto(response.getRefused());
            default: return null;
        }
    }

    private boolean isSendClosed() {
        synchronized (sending) {
            return sendClosed;
        }
    }

    /**
     * The stream's first message: the epoch, the seq it starts from, and the resume outcome.
     *
     * @return the {@code started} message
     */
    public WatchStarted started() {
        return started;
    }

    /**
     * Where the stream stands: the last notice batch's or progress's seq taken from it (the
     * {@code started} seq before any); resume a new stream with it after a disconnect.
     *
     * @return the current resume token
     */
    public ResumeToken resumeToken() {
        return token;
    }

    /**
     * Events read from the server and not yet taken.
     *
     * @return the count (at most the buffer bound, and one more for the end)
     */
    public int buffered() {
        return events.size();
    }

    // ---------------------------------------------------------------- sends

    private long send(WatchRequest request) {
        synchronized (sending) {
            if (sendClosed) {
                throw new StreamEndedException("the Watch stream is closed");
            }
            requests.onNext(request);
            sent += 1;
            return sent;
        }
    }

    private static CoordinatorOuterClass.KeyList keys(Collection<String> keys) {
        return CoordinatorOuterClass.KeyList.newBuilder().addAllKeys(keys).build();
    }

    /**
     * Tracks exact keys (do it before reading them from the origin).
     *
     * @param keys the keys
     * @return the request's number on the stream (the start was 1), as a {@link Refused} names it
     */
    public long track(Collection<String> keys) {
        return send(WatchRequest.newBuilder().setTrack(keys(keys)).build());
    }

    /**
     * Stops tracking keys.
     *
     * @param keys the keys
     * @return the request's number on the stream
     */
    public long untrack(Collection<String> keys) {
        return send(WatchRequest.newBuilder().setUntrack(keys(keys)).build());
    }

    /**
     * Watches prefixes (every notice under them; "" is every key).
     *
     * @param prefixes the prefixes
     * @return the request's number on the stream
     */
    public long subscribe(Collection<String> prefixes) {
        return send(WatchRequest.newBuilder().setSubscribe(keys(prefixes)).build());
    }

    /**
     * Stops watching prefixes.
     *
     * @param prefixes the prefixes
     * @return the request's number on the stream
     */
    public long unsubscribe(Collection<String> prefixes) {
        return send(WatchRequest.newBuilder().setUnsubscribe(keys(prefixes)).build());
    }

    /**
     * Acknowledges every notice up to {@code seq} as applied.
     *
     * @param seq the seq
     * @return the request's number on the stream
     */
    public long ack(long seq) {
        return send(WatchRequest.newBuilder().setAck(CoordinatorOuterClass.Ack.newBuilder().setSeq(seq)).build());
    }

    /**
     * Asks for a watermark: what is queued, then a {@link Progress}.
     *
     * @return the request's number on the stream
     */
    public long requestProgress() {
        return send(WatchRequest.newBuilder()
                .setProgress(CoordinatorOuterClass.ProgressRequest.getDefaultInstance())
                .build());
    }

    // -------------------------------------------------------------- receive

    /**
     * The next event, waiting at most {@code timeout}.
     *
     * @param timeout how long to wait; null: without end
     * @return the event, or empty after the timeout
     * @throws FreshdException when the stream failed (the same each time after)
     * @throws StreamEndedException when it ended without an error
     */
    public Optional<WatchEvent> poll(Duration timeout) {
        synchronized (events) {
            if (ended != null) {
                throw ended;
            }
            Object item;
            try {
                item = timeout == null ? events.take() : events.poll(timeout.toNanos(), TimeUnit.NANOSECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw FreshdException.of(Status.Code.CANCELLED, "interrupted", "Watch", e);
            }
            if (item == null) {
                return Optional.empty();
            }
            if (item == END) {
                ended = new StreamEndedException("the Watch stream ended");
                throw ended;
            }
            if (item instanceof FreshdException e) {
                ended = e;
                throw e;
            }
            ClientCallStreamObserver<WatchRequest> c = call;
            if (c != null) {
                c.request(1);
            }
            WatchEvent event = (WatchEvent) item;
            if (event instanceof NoticeBatch b && !b.notices().isEmpty()) {
                token = new ResumeToken(token.epoch(), b.notices().get(b.notices().size() - 1).seq());
            } else if (event instanceof Progress p) {
                token = new ResumeToken(p.epoch(), p.seq());
            }
            return Optional.of(event);
        }
    }

    /**
     * The next event, waiting for it.
     *
     * @return the event
     * @throws FreshdException when the stream failed
     * @throws StreamEndedException when it ended without an error
     */
    public WatchEvent take() {
        return poll(null).orElseThrow();
    }

    /**
     * The events until the stream ends without an error; a failure is thrown from {@code next()}.
     *
     * @return an iterator over the events
     */
    @Override
    public Iterator<WatchEvent> iterator() {
        return new Iterator<>() {
            private WatchEvent next;
            private boolean done;

            @Override
            public boolean hasNext() {
                if (next != null) {
                    return true;
                }
                if (done) {
                    return false;
                }
                try {
                    next = take();
                    return true;
                } catch (StreamEndedException e) {
                    done = true;
                    return false;
                }
            }

            @Override
            public WatchEvent next() {
                if (!hasNext()) {
                    throw new NoSuchElementException();
                }
                WatchEvent e = next;
                next = null;
                return e;
            }
        };
    }

    /**
     * Requests progress and collects every notice, reset and refusal up to it. Not for use while
     * another thread receives from the stream.
     *
     * @param timeout how long to wait for each event
     * @return what arrived, in order
     * @throws FreshdException when the stream failed, or DEADLINE_EXCEEDED after the timeout
     */
    public SyncResult sync(Duration timeout) {
        requestProgress();
        List<Notice> notices = new ArrayList<>();
        List<Reset> resets = new ArrayList<>();
        List<Refused> refused = new ArrayList<>();
        while (true) {
            WatchEvent event = poll(timeout).orElseThrow(() -> FreshdException.of(
                    Status.Code.DEADLINE_EXCEEDED, "no progress within " + timeout, "Watch", null));
            if (event instanceof NoticeBatch b) {
                notices.addAll(b.notices());
            } else if (event instanceof Reset r) {
                resets.add(r);
            } else if (event instanceof Refused r) {
                refused.add(r);
            } else if (event instanceof Progress p) {
                return new SyncResult(notices, resets, p, refused);
            }
        }
    }

    // -------------------------------------------------------------- closing

    /** Closes the client side: the server then ends the stream. */
    public void closeSend() {
        synchronized (sending) {
            if (!sendClosed) {
                sendClosed = true;
                requests.onCompleted();
            }
        }
    }

    /** Cancels the call at once. */
    public void cancel() {
        synchronized (sending) {
            sendClosed = true;
        }
        ClientCallStreamObserver<WatchRequest> c = call;
        if (c != null) {
            c.cancel("the Watch stream was closed", null);
        }
    }

    /**
     * Waits until the stream has ended (on either side).
     *
     * @param timeout how long to wait
     * @return whether it ended
     */
    public boolean awaitTermination(Duration timeout) {
        try {
            return terminated.await(timeout.toNanos(), TimeUnit.NANOSECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        }
    }

    /** Cancels the call (as {@link #cancel()}). */
    @Override
    public void close() {
        cancel();
    }
}
