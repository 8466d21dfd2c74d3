package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import io.grpc.Status;

/**
 * A request the server refused on a stream opened with {@code refusalsInBand}: nothing of it was
 * applied, and the stream goes on.
 *
 * @param request which request: 1 is the stream's start, 2 the request after it, and so on
 * @param code the status code the request would have ended the stream with
 * @param message what was wrong, naming the field and the limit
 * @param raw the message
 */
public record Refused(long request, Status.Code code, String message, CoordinatorOuterClass.Refused raw)
        implements WatchEvent {

    static Refused fromProto(CoordinatorOuterClass.Refused m) {
        return new Refused(m.getRequest(), Status.fromCodeValue(m.getCode()).getCode(), m.getMessage(), m);
    }
}
