package dev.freshd.client;

import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import com.google.protobuf.Descriptors.EnumDescriptor;
import com.google.protobuf.Descriptors.EnumValueDescriptor;
import com.google.protobuf.Descriptors.FieldDescriptor;
import com.google.protobuf.Message;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.OptionalLong;
import java.util.TreeSet;
import java.util.stream.Stream;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/**
 * Runs every scenario of {@code tests/conformance/} (the format is in its README) against a fresh
 * real server, through the typed client. New files run without code changes.
 */
class ConformanceTest {

    static Path conformanceDir() {
        return FreshdServer.repo().resolve("tests").resolve("conformance");
    }

    static List<Path> scenarios() {
        try (Stream<Path> files = Files.list(conformanceDir())) {
            return files.filter(p -> p.getFileName().toString().endsWith(".json")).sorted().toList();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    @TestFactory
    Stream<DynamicTest> scenario() {
        List<Path> paths = scenarios();
        assertFalse(paths.isEmpty(), "no scenario in " + conformanceDir());
        return paths.stream().map(path -> {
            String name = path.getFileName().toString().replaceFirst("\\.json$", "");
            return DynamicTest.dynamicTest(name, path.toUri(), () -> runScenario(path));
        });
    }

    @SuppressWarnings("unchecked")
    static void runScenario(Path path) throws IOException {
        Map<String, Object> scenario = (Map<String, Object>) fromJson(
                JsonParser.parseString(Files.readString(path, StandardCharsets.UTF_8)));
        Map<String, String> settings = new LinkedHashMap<>();
        Object server = scenario.get("server");
        if (server instanceof Map<?, ?> m) {
            m.forEach((k, v) -> settings.put(String.valueOf(k), settingValue(v)));
        }
        try (FreshdServer s = FreshdServer.start(settings);
                FreshdClient client = FreshdClient.builder(s.addr()).timeout(Duration.ofSeconds(5)).build();
                Runner runner = new Runner(client)) {
            runner.run((List<Object>) scenario.get("steps"));
        }
    }

    private static String settingValue(Object v) {
        if (v instanceof BigDecimal d) {
            return d.stripTrailingZeros().toPlainString();
        }
        return String.valueOf(v);
    }

    // ------------------------------------------------------------ conversion

    /** JSON as plain values: maps, lists, strings, booleans, BigDecimal numbers, null. */
    static Object fromJson(JsonElement e) {
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (e.isJsonObject()) {
            Map<String, Object> out = new LinkedHashMap<>();
            for (Map.Entry<String, JsonElement> entry : e.getAsJsonObject().entrySet()) {
                out.put(entry.getKey(), fromJson(entry.getValue()));
            }
            return out;
        }
        if (e.isJsonArray()) {
            List<Object> out = new ArrayList<>();
            for (JsonElement item : (JsonArray) e) {
                out.add(fromJson(item));
            }
            return out;
        }
        JsonPrimitive p = e.getAsJsonPrimitive();
        if (p.isBoolean()) {
            return p.getAsBoolean();
        }
        if (p.isNumber()) {
            return p.getAsBigDecimal();
        }
        return p.getAsString();
    }

    /** Freshness -> FRESHNESS_, ResetReason -> RESET_REASON_. */
    static String enumPrefix(EnumDescriptor e) {
        return e.getName().replaceAll("(?<!^)(?=[A-Z])", "_").toUpperCase(java.util.Locale.ROOT) + "_";
    }

    private static Object convertValue(Object value, FieldDescriptor field) {
        switch (field.getJavaType()) {
            case MESSAGE:
                return toMap((Message) value);
            case ENUM: {
                String name = ((EnumValueDescriptor) value).getName();
                String prefix = enumPrefix(field.getEnumType());
                return name.startsWith(prefix) ? name.substring(prefix.length()) : name;
            }
            case LONG: {
                long v = (Long) value;
                boolean unsigned = field.getType() == FieldDescriptor.Type.UINT64
                        || field.getType() == FieldDescriptor.Type.FIXED64;
                return unsigned && v < 0 ? new BigDecimal(new BigInteger(Long.toUnsignedString(v))) : BigDecimal.valueOf(v);
            }
            case INT: {
                int v = (Integer) value;
                boolean unsigned = field.getType() == FieldDescriptor.Type.UINT32
                        || field.getType() == FieldDescriptor.Type.FIXED32;
                return BigDecimal.valueOf(unsigned ? Integer.toUnsignedLong(v) : v);
            }
            case FLOAT:
                return new BigDecimal(Float.toString((Float) value));
            case DOUBLE:
                return BigDecimal.valueOf((Double) value);
            default:
                return value;
        }
    }

    /**
     * A response as the scenarios see it: proto field names, every field without presence with
     * its default, enums without their prefix, numbers as numbers.
     */
    static Map<String, Object> toMap(Message message) {
        Map<String, Object> out = new LinkedHashMap<>();
        for (FieldDescriptor field : message.getDescriptorForType().getFields()) {
            if (field.isRepeated()) {
                List<Object> items = new ArrayList<>();
                for (int i = 0; i < message.getRepeatedFieldCount(field); i++) {
                    items.add(convertValue(message.getRepeatedField(field, i), field));
                }
                out.put(field.getName(), items);
            } else if (!field.hasPresence() || message.hasField(field)) {
                out.put(field.getName(), convertValue(message.getField(field), field));
            }
        }
        return out;
    }

    // -------------------------------------------------------------- matching

    private static boolean isNumber(Object x) {
        return x instanceof Number;
    }

    private static BigDecimal number(Object x) {
        if (x instanceof BigDecimal d) {
            return d;
        }
        if (x instanceof Double || x instanceof Float) {
            return BigDecimal.valueOf(((Number) x).doubleValue());
        }
        return new BigDecimal(x.toString());
    }

    /**
     * {@code expected} as a subset of {@code actual}: objects by their keys, lists element by
     * element with the same length, numbers as numbers.
     */
    static void match(Object expected, Object actual, String where) {
        if (expected instanceof Map<?, ?> e) {
            if (!(actual instanceof Map<?, ?> a)) {
                throw new AssertionError(where + ": expected an object, got " + actual);
            }
            for (Map.Entry<?, ?> entry : e.entrySet()) {
                if (!a.containsKey(entry.getKey())) {
                    throw new AssertionError(where + ": no field '" + entry.getKey() + "' in " + actual);
                }
                match(entry.getValue(), a.get(entry.getKey()), where + "." + entry.getKey());
            }
        } else if (expected instanceof List<?> e) {
            if (!(actual instanceof List<?> a)) {
                throw new AssertionError(where + ": expected a list, got " + actual);
            }
            if (e.size() != a.size()) {
                throw new AssertionError(where + ": expected " + e.size() + " elements, got " + a.size() + ": " + actual);
            }
            for (int i = 0; i < e.size(); i++) {
                match(e.get(i), a.get(i), where + "[" + i + "]");
            }
        } else if (expected instanceof Boolean || actual instanceof Boolean) {
            if (!(expected instanceof Boolean && actual instanceof Boolean && expected.equals(actual))) {
                throw new AssertionError(where + ": expected " + show(expected) + ", got " + show(actual));
            }
        } else if (isNumber(expected) || isNumber(actual)) {
            Object exp = expected;
            if (exp instanceof String s && s.matches("-?\\d+")) {
                exp = new BigDecimal(s);
            }
            if (!(isNumber(exp) && isNumber(actual) && number(exp).compareTo(number(actual)) == 0)) {
                throw new AssertionError(where + ": expected " + show(expected) + ", got " + show(actual));
            }
        } else if (expected == null ? actual != null : !expected.equals(actual)) {
            throw new AssertionError(where + ": expected " + show(expected) + ", got " + show(actual));
        }
    }

    private static String show(Object x) {
        if (x instanceof String s) {
            return "'" + s + "'";
        }
        if (x instanceof BigDecimal d) {
            return d.toPlainString();
        }
        return String.valueOf(x);
    }

    /** A response field by name (dots and list indexes for nested ones). */
    static Object lookup(Object response, String path) {
        Object value = response;
        for (String part : path.split("\\.")) {
            if (value instanceof List<?> l) {
                value = l.get(Integer.parseInt(part));
            } else if (value instanceof Map<?, ?> m) {
                if (!m.containsKey(part)) {
                    throw new AssertionError("no field '" + part + "' to save in " + response);
                }
                value = m.get(part);
            } else {
                throw new AssertionError("cannot look up '" + path + "' in " + response);
            }
        }
        return value;
    }

    // ----------------------------------------------------------------- runner

    /** Interprets steps with the typed client. */
    static final class Runner implements AutoCloseable {
        private final FreshdClient client;
        private final Map<String, Object> vars = new LinkedHashMap<>();
        private final Map<String, WatchStream> streams = new LinkedHashMap<>();

        Runner(FreshdClient client) {
            this.client = client;
        }

        @Override
        public void close() {
            streams.values().forEach(WatchStream::cancel);
        }

        @SuppressWarnings("unchecked")
        void run(List<Object> steps) {
            for (int i = 0; i < steps.size(); i++) {
                Map<String, Object> step = (Map<String, Object>) steps.get(i);
                try {
                    step(new LinkedHashMap<>(step));
                } catch (AssertionError e) {
                    throw new AssertionError("step " + i + " (" + step.get("op") + "): " + e.getMessage()
                            + "\n  step: " + step, e);
                }
            }
        }

        Object substitute(Object value) {
            if (value instanceof String s && s.startsWith("$")) {
                String name = s.substring(1);
                if (!vars.containsKey(name)) {
                    throw new AssertionError("variable " + s + " is not set (have " + new TreeSet<>(vars.keySet()) + ")");
                }
                return vars.get(name);
            }
            if (value instanceof Map<?, ?> m) {
                Map<String, Object> out = new LinkedHashMap<>();
                m.forEach((k, v) -> out.put(String.valueOf(k), substitute(v)));
                return out;
            }
            if (value instanceof List<?> l) {
                List<Object> out = new ArrayList<>();
                l.forEach(v -> out.add(substitute(v)));
                return out;
            }
            return value;
        }

        @SuppressWarnings("unchecked")
        private void step(Map<String, Object> step) {
            String op = (String) step.remove("op");
            Object expect = step.remove("expect");
            String expectError = (String) step.remove("expect_error");
            String errorContains = (String) step.remove("expect_error_contains");
            Map<String, Object> save = (Map<String, Object>) step.remove("save");
            Args args = new Args((Map<String, Object>) substitute(step));
            Object response;
            try {
                response = dispatch(op, args);
                args.requireConsumed(op);
            } catch (FreshdException e) {
                if (expectError == null) {
                    throw new AssertionError("failed with " + e.codeName() + ": " + e.description());
                }
                if (!e.codeName().equals(expectError)) {
                    throw new AssertionError("expected " + expectError + ", got " + e.codeName() + ": " + e.description());
                }
                if (errorContains != null && !e.description().contains(errorContains)) {
                    throw new AssertionError("expected the message to contain '" + errorContains + "': '"
                            + e.description() + "'");
                }
                return;
            }
            if (expectError != null) {
                throw new AssertionError("expected " + expectError + ", got success: " + response);
            }
            if (response instanceof Map<?, ?> m && m.get("epoch") instanceof BigDecimal epoch
                    && epoch.signum() != 0) {
                vars.put("epoch", epoch);
            }
            if (expect != null) {
                match(substitute(expect), response, "response");
            }
            if (save != null) {
                if (!(response instanceof Map)) {
                    throw new AssertionError("nothing to save from " + op);
                }
                save.forEach((name, field) -> vars.put(name, lookup(response, String.valueOf(field))));
            }
        }

        private Object dispatch(String op, Args a) {
            switch (op) {
                case "publish": {
                    List<Change> changes = new ArrayList<>();
                    for (Map<String, Object> c : a.maps("changes")) {
                        Args ca = new Args(c);
                        Change change = new Change(
                                ca.string("key", null),
                                ca.has("external_version") ? OptionalLong.of(ca.number("external_version", 0))
                                        : OptionalLong.empty(),
                                ca.bool("critical"),
                                ca.number("event_time_unix_ms", 0));
                        ca.requireConsumed("publish.changes[]");
                        changes.add(change);
                    }
                    return toMap(client.publish(changes, a.string("client_id", null)).raw());
                }
                case "fill":
                    return toMap(client.fill(a.string("key", null), a.strings("dependencies"), FillOptions.builder()
                            .ttlMs(a.number("ttl_ms", 0))
                            .observedSeq(a.number("observed_seq", 0))
                            .epoch(a.number("epoch", 0))
                            .leaseToken(a.number("lease_token", 0))
                            .clientId(a.string("client_id", null))
                            .build()).raw());
                case "check":
                    return toMap(client.check(a.string("key", null), a.number("version", 0), CheckOptions.builder()
                            .ageMs(a.number("age_ms", 0))
                            .epoch(a.number("epoch", 0))
                            .minSeq(a.number("min_seq", 0))
                            .endpoint(a.string("endpoint", ""))
                            .served(a.bool("served"))
                            .clientId(a.string("client_id", null))
                            .build()).raw());
                case "check_batch": {
                    List<CheckItem> items = new ArrayList<>();
                    for (Map<String, Object> i : a.maps("items")) {
                        Args ia = new Args(i);
                        items.add(new CheckItem(ia.string("key", null), ia.number("version", 0),
                                ia.number("age_ms", 0), ia.bool("served")));
                        ia.requireConsumed("check_batch.items[]");
                    }
                    return toMap(client.checkBatch(items, CheckBatchOptions.builder()
                            .epoch(a.number("epoch", 0))
                            .minSeq(a.number("min_seq", 0))
                            .endpoint(a.string("endpoint", ""))
                            .clientId(a.string("client_id", null))
                            .build()).raw());
                }
                case "inspect":
                    return toMap(client.inspect(a.string("key", null)).raw());
                case "stats":
                    return toMap(client.stats().raw());
                case "lease":
                    return toMap(client.lease(a.string("key", null), a.number("min_seq", 0)).raw());
                case "purge":
                    return toMap(client.purge(a.string("prefix", null), PurgeOptions.builder()
                            .dryRun(a.bool("dry_run"))
                            .hard(a.bool("hard"))
                            .confirm(a.bool("confirm"))
                            .jitterMs(a.number("jitter_ms", 0))
                            .clientId(a.string("client_id", null))
                            .build()).raw());
                case "set_policy": {
                    Args pa = new Args(a.map("policy"));
                    Policy.Builder p = Policy.builder()
                            .maxAgeMs(pa.number("max_age_ms", 0))
                            .revalidateAfterMs(pa.number("revalidate_after_ms", 0))
                            .staleWhileRevalidateMs(pa.number("stale_while_revalidate_ms", 0))
                            .allowStaleOnCritical(pa.bool("allow_stale_on_critical"));
                    if (pa.has("check_sample_rate")) {
                        p.checkSampleRate(pa.decimal("check_sample_rate"));
                    }
                    pa.requireConsumed("set_policy.policy");
                    return toMap(client.setPolicy(a.string("namespace", ""), p.build()).raw());
                }
                case "get_policy":
                    return toMap(client.getPolicy(a.string("namespace", "")).raw());
                case "sleep":
                    FreshdServer.pause(Duration.ofMillis(a.number("ms", 0)));
                    return null;
                case "watch_open":
                    return watchOpen(a);
                case "watch_send":
                    watchSend(a);
                    return null;
                case "watch_sync":
                    return watchSync(a);
                case "watch_close": {
                    WatchStream stream = stream(a);
                    stream.closeSend();
                    // The server ends the stream once it reads the close: wait for it, so that
                    // the next steps find it gone.
                    assertTrue(stream.awaitTermination(Duration.ofSeconds(5)), "the server did not end the stream");
                    return null;
                }
                default:
                    throw new AssertionError("unknown op '" + op + "'");
            }
        }

        private Object watchOpen(Args a) {
            String name = a.string("stream", null);
            if (streams.containsKey(name)) {
                throw new AssertionError("stream '" + name + "' is already open");
            }
            WatchOptions.Builder options = WatchOptions.builder()
                    .clientId(a.string("client_id", null))
                    .noLoop(a.bool("no_loop"))
                    .track(a.strings("track"))
                    .subscribe(a.strings("subscribe"))
                    .refusalsInBand(a.bool("refusals_in_band"));
            if (a.has("resume")) {
                Args ra = new Args(a.map("resume"));
                options.resume(new ResumeToken(ra.number("epoch", 0), ra.number("seq", 0)));
                ra.requireConsumed("watch_open.resume");
            }
            a.requireConsumed("watch_open");
            WatchStream stream = client.watch(options.build());
            streams.put(name, stream);
            return toMap(stream.started().raw());
        }

        private WatchStream stream(Args a) {
            String name = a.string("stream", null);
            WatchStream stream = streams.get(name);
            if (stream == null) {
                throw new AssertionError("no open stream '" + name + "'");
            }
            return stream;
        }

        private void watchSend(Args a) {
            WatchStream stream = stream(a);
            List<String> kinds = a.remaining();
            if (kinds.size() != 1) {
                throw new AssertionError("watch_send takes one request: " + kinds);
            }
            switch (kinds.get(0)) {
                case "ack" -> stream.ack(a.number("ack", 0));
                case "track" -> stream.track(a.strings("track"));
                case "untrack" -> stream.untrack(a.strings("untrack"));
                case "subscribe" -> stream.subscribe(a.strings("subscribe"));
                case "unsubscribe" -> stream.unsubscribe(a.strings("unsubscribe"));
                default -> throw new AssertionError("unknown watch_send request '" + kinds.get(0) + "'");
            }
        }

        private Object watchSync(Args a) {
            WatchStream stream = stream(a);
            SyncResult synced = stream.sync(Duration.ofSeconds(10));
            Map<String, Object> out = new LinkedHashMap<>();
            out.put("notices", synced.notices().stream().map(n -> (Object) toMap(n.raw())).toList());
            out.put("resets", synced.resets().stream().map(r -> (Object) toMap(r.raw())).toList());
            List<Object> refused = new ArrayList<>();
            for (Refused r : synced.refused()) {
                Map<String, Object> m = new LinkedHashMap<>();
                m.put("request", BigDecimal.valueOf(r.request()));
                m.put("code", r.code().name());
                m.put("message", r.message());
                refused.add(m);
            }
            out.put("refused", refused);
            out.put("progress", BigDecimal.valueOf(synced.progress().seq()));
            return out;
        }
    }

    /** A step's fields, each taken once; what is left over is an error. */
    static final class Args {
        private final Map<String, Object> fields;

        Args(Map<String, Object> fields) {
            this.fields = new LinkedHashMap<>(fields);
        }

        boolean has(String name) {
            return fields.containsKey(name);
        }

        List<String> remaining() {
            return List.copyOf(fields.keySet());
        }

        void requireConsumed(String what) {
            if (!fields.isEmpty()) {
                throw new AssertionError(what + " does not take " + fields.keySet());
            }
        }

        String string(String name, String fallback) {
            Object v = fields.remove(name);
            if (v == null) {
                if (fallback == null && !"client_id".equals(name)) {
                    throw new AssertionError("missing field '" + name + "'");
                }
                return fallback;
            }
            if (!(v instanceof String s)) {
                throw new AssertionError("field '" + name + "' must be a string: " + v);
            }
            return s;
        }

        long number(String name, long fallback) {
            Object v = fields.remove(name);
            if (v == null) {
                return fallback;
            }
            if (v instanceof String s && s.matches("-?\\d+")) {
                return new BigInteger(s).longValue();
            }
            if (!(v instanceof Number n)) {
                throw new AssertionError("field '" + name + "' must be a number: " + v);
            }
            return ConformanceTest.number(n).toBigIntegerExact().longValue();
        }

        double decimal(String name) {
            Object v = fields.remove(name);
            if (!(v instanceof Number n)) {
                throw new AssertionError("field '" + name + "' must be a number: " + v);
            }
            return n.doubleValue();
        }

        boolean bool(String name) {
            Object v = fields.remove(name);
            if (v == null) {
                return false;
            }
            if (!(v instanceof Boolean b)) {
                throw new AssertionError("field '" + name + "' must be a boolean: " + v);
            }
            return b;
        }

        @SuppressWarnings("unchecked")
        Map<String, Object> map(String name) {
            Object v = fields.remove(name);
            if (!(v instanceof Map)) {
                throw new AssertionError("field '" + name + "' must be an object: " + v);
            }
            return (Map<String, Object>) v;
        }

        @SuppressWarnings("unchecked")
        List<Map<String, Object>> maps(String name) {
            Object v = fields.remove(name);
            if (!(v instanceof List)) {
                throw new AssertionError("field '" + name + "' must be a list: " + v);
            }
            for (Object item : (List<Object>) v) {
                if (!(item instanceof Map)) {
                    throw new AssertionError("field '" + name + "' must hold objects: " + v);
                }
            }
            return (List<Map<String, Object>>) v;
        }

        List<String> strings(String name) {
            Object v = fields.remove(name);
            if (v == null) {
                return List.of();
            }
            if (!(v instanceof List<?> l)) {
                throw new AssertionError("field '" + name + "' must be a list: " + v);
            }
            List<String> out = new ArrayList<>();
            for (Object item : l) {
                if (!(item instanceof String s)) {
                    throw new AssertionError("field '" + name + "' must hold strings: " + v);
                }
                out.add(s);
            }
            return out;
        }
    }

    // --------------------------------------------- the runner checks for real

    private static Object json(String text) {
        return fromJson(JsonParser.parseString(text));
    }

    @Test
    void theSuiteIsThere() {
        assertFalse(scenarios().isEmpty(), "no scenario in " + conformanceDir());
    }

    @Test
    void matchIsASubsetMatchThatFailsOnDifferences() {
        Object actual = json("{\"freshness\": \"FRESH\", \"version\": 7, \"results\": [{\"decision\": \"FRESH\"}],"
                + " \"critical\": false}");
        match(json("{\"freshness\": \"FRESH\", \"version\": 7}"), actual, "r");
        match(json("{\"results\": [{}]}"), actual, "r");
        match(json("{\"version\": \"7\"}"), actual, "r");
        for (String wrong : List.of(
                "{\"freshness\": \"STALE\"}",
                "{\"version\": 8}",
                "{\"results\": []}",
                "{\"results\": [{\"decision\": \"FRESH\"}, {\"decision\": \"FRESH\"}]}",
                "{\"critical\": 0}",
                "{\"missing\": 1}")) {
            assertThrows(AssertionError.class, () -> match(json(wrong), actual, "r"), wrong);
        }
    }

    @Test
    void responsesConvertEnumsAndNumbers() {
        try (FreshdServer server = FreshdServer.start(); FreshdClient client = server.client()) {
            client.fill("feed:1", List.of("posts:1"), FillOptions.builder().ttlMs(60000).build());
            Map<String, Object> converted = toMap(client.check("feed:1", 1L << 40).raw());
            match(json("{\"freshness\": \"STALE\", \"decision\": \"REFETCH\", \"version\": 1, \"critical\": false}"),
                    converted, "r");
            assertTrue(((BigDecimal) converted.get("epoch")).signum() > 0);
        }
    }

    @Test
    void aWrongExpectationFailsTheScenario() {
        try (FreshdServer server = FreshdServer.start(); FreshdClient client = server.client()) {
            List<Object> steps = List.of(
                    json("{\"op\": \"fill\", \"key\": \"k\", \"dependencies\": [\"d\"], \"ttl_ms\": 60000,"
                            + " \"observed_seq\": 0, \"save\": {\"v\": \"version\"}}"),
                    json("{\"op\": \"publish\", \"changes\": [{\"key\": \"d\"}]}"),
                    json("{\"op\": \"check\", \"key\": \"k\", \"version\": \"$v\", \"expect\": {\"freshness\": \"FRESH\"}}"));
            AssertionError e = assertThrows(AssertionError.class, () -> new Runner(client).run(steps));
            assertTrue(e.getMessage().matches("(?s)step 2 \\(check\\).*expected 'FRESH', got 'STALE'.*"), e.getMessage());
            e = assertThrows(AssertionError.class,
                    () -> new Runner(client).run(List.of(json("{\"op\": \"stats\", \"expect_error\": \"ABORTED\"}"))));
            assertTrue(e.getMessage().contains("expected ABORTED, got success"), e.getMessage());
            e = assertThrows(AssertionError.class,
                    () -> new Runner(client).run(List.of(json("{\"op\": \"inspect\", \"key\": \"nothing\"}"))));
            assertTrue(e.getMessage().contains("failed with NOT_FOUND"), e.getMessage());
            e = assertThrows(AssertionError.class, () -> new Runner(client).run(
                    List.of(json("{\"op\": \"check\", \"key\": \"k\", \"version\": \"$nope\"}"))));
            assertTrue(e.getMessage().contains("variable $nope is not set"), e.getMessage());
        }
    }
}
