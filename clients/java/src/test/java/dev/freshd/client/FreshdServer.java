package dev.freshd.client;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.function.BooleanSupplier;
import java.util.function.Supplier;

/** One real freshd process on 127.0.0.1, for the tests: started, stopped, restarted. */
final class FreshdServer implements AutoCloseable {
    private final Map<String, String> settings;
    private final List<String> extraArgs;
    private final List<String> log = Collections.synchronizedList(new ArrayList<>());
    private Process process;
    private int port;
    private String addr = "";
    private long epoch;

    private FreshdServer(Map<String, String> settings, List<String> extraArgs, int port) {
        this.settings = new LinkedHashMap<>(settings);
        this.extraArgs = List.copyOf(extraArgs);
        this.port = port;
    }

    /** A fresh server with the default settings. */
    static FreshdServer start() {
        return start(Map.of());
    }

    /** A fresh server with settings as in the conformance files ({@code lease_ttl -> 200ms}). */
    static FreshdServer start(Map<String, String> settings) {
        return start(settings, List.of());
    }

    /** A fresh server with settings and further command-line arguments. */
    static FreshdServer start(Map<String, String> settings, List<String> extraArgs) {
        FreshdServer server = new FreshdServer(settings, extraArgs, 0);
        server.launch();
        return server;
    }

    /** The repository's root: the {@code freshd.repo} property, else found upwards from here. */
    static Path repo() {
        String configured = System.getProperty("freshd.repo");
        if (configured != null && !configured.isEmpty()) {
            return Path.of(configured).toAbsolutePath().normalize();
        }
        Path dir = Path.of("").toAbsolutePath();
        while (dir != null) {
            if (Files.isRegularFile(dir.resolve("proto/freshd/v1/coordinator.proto"))) {
                return dir;
            }
            dir = dir.getParent();
        }
        throw new IllegalStateException("cannot find the repository root above " + Path.of("").toAbsolutePath());
    }

    /**
     * {@code FRESHD_BIN}, else {@code <repo>/target/debug/freshd} (or under {@code CARGO_TARGET_DIR}),
     * built with {@code cargo build --bin freshd} when missing.
     */
    static synchronized Path binary() {
        String configured = System.getenv("FRESHD_BIN");
        if (configured != null && !configured.isEmpty()) {
            Path path = Path.of(configured);
            if (!Files.isRegularFile(path)) {
                throw new IllegalStateException("FRESHD_BIN=" + configured + " does not exist");
            }
            return path;
        }
        Path repo = repo();
        String targetDir = System.getenv("CARGO_TARGET_DIR");
        Path target = targetDir == null || targetDir.isEmpty() ? repo.resolve("target") : repo.resolve(targetDir);
        Path path = target.resolve("debug").resolve("freshd");
        if (!Files.isRegularFile(path)) {
            try {
                Process cargo = new ProcessBuilder("cargo", "build", "--bin", "freshd")
                        .directory(repo.toFile())
                        .inheritIO()
                        .start();
                if (cargo.waitFor() != 0) {
                    throw new IllegalStateException("cargo build --bin freshd failed");
                }
            } catch (IOException e) {
                throw new IllegalStateException(path + " is missing and cargo cannot build it: " + e.getMessage(), e);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new IllegalStateException("interrupted while building freshd", e);
            }
        }
        return path;
    }

    private void launch() {
        List<String> args = new ArrayList<>(List.of(
                binary().toString(), "--listen", "127.0.0.1:" + port, "--log-format", "json"));
        for (Map.Entry<String, String> e : settings.entrySet()) {
            args.add("--" + e.getKey().replace('_', '-'));
            args.add(e.getValue());
        }
        if (!settings.containsKey("admin_listen")) {
            args.add("--admin-listen");
            args.add("off");
        }
        args.addAll(extraArgs);
        ProcessBuilder builder = new ProcessBuilder(args).redirectErrorStream(true);
        builder.redirectInput(ProcessBuilder.Redirect.from(new java.io.File("/dev/null")));
        builder.environment().putIfAbsent("RUST_LOG", "info");
        CompletableFuture<JsonObject> serving = new CompletableFuture<>();
        try {
            process = builder.start();
        } catch (IOException e) {
            throw new IllegalStateException("cannot start freshd: " + e.getMessage(), e);
        }
        Process proc = process;
        Thread reader = new Thread(() -> readLog(proc, serving), "freshd-log");
        reader.setDaemon(true);
        reader.start();
        JsonObject fields;
        try {
            fields = serving.get(20, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            kill();
            throw new IllegalStateException("freshd did not report serving within 20s: " + log, e);
        } catch (ExecutionException e) {
            throw new IllegalStateException("freshd exited before serving: " + log, e.getCause());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            kill();
            throw new IllegalStateException("interrupted", e);
        }
        addr = fields.get("addr").getAsString();
        port = Integer.parseInt(addr.substring(addr.lastIndexOf(':') + 1));
        epoch = fields.has("epoch") ? fields.get("epoch").getAsLong() : 0;
    }

    private void readLog(Process proc, CompletableFuture<JsonObject> serving) {
        try (BufferedReader r = new BufferedReader(new InputStreamReader(proc.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = r.readLine()) != null) {
                log.add(line);
                if (serving.isDone()) {
                    continue;
                }
                try {
                    JsonElement parsed = JsonParser.parseString(line);
                    if (!parsed.isJsonObject()) {
                        continue;
                    }
                    JsonObject record = parsed.getAsJsonObject();
                    JsonObject fields = record.has("fields") && record.get("fields").isJsonObject()
                            ? record.getAsJsonObject("fields") : record;
                    JsonElement message = fields.get("message");
                    if (message != null && message.isJsonPrimitive()
                            && "freshd serving".equals(message.getAsString()) && fields.has("addr")) {
                        serving.complete(fields);
                    }
                } catch (RuntimeException notJson) {
                    // not a JSON line
                }
            }
        } catch (IOException e) {
            // the process ended
        }
        serving.completeExceptionally(new IllegalStateException("freshd exited"));
    }

    /** {@code 127.0.0.1:port}. */
    String addr() {
        return addr;
    }

    int port() {
        return port;
    }

    /** The epoch the server reported when it started serving. */
    long epoch() {
        return epoch;
    }

    List<String> log() {
        synchronized (log) {
            return List.copyOf(log);
        }
    }

    boolean running() {
        return process != null && process.isAlive();
    }

    /** SIGTERM (graceful drain), then SIGKILL if it lingers. */
    void stop() {
        if (process == null || !process.isAlive()) {
            return;
        }
        process.destroy();
        try {
            if (!process.waitFor(10, TimeUnit.SECONDS)) {
                kill();
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            kill();
        }
    }

    /** SIGKILL: a crash, nothing drained. */
    void kill() {
        if (process != null && process.isAlive()) {
            process.destroyForcibly();
            try {
                process.waitFor(10, TimeUnit.SECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** A new process on the same port: a new epoch, nothing remembered. */
    void restart() {
        kill();
        long deadline = System.nanoTime() + Duration.ofSeconds(10).toNanos();
        while (true) {
            try {
                launch();
                return;
            } catch (IllegalStateException e) {
                // The port may linger for a moment after the old process.
                if (System.nanoTime() > deadline) {
                    throw e;
                }
                pause(Duration.ofMillis(50));
            }
        }
    }

    @Override
    public void close() {
        stop();
    }

    /** A client of this server with a 5 s timeout. */
    FreshdClient client() {
        return FreshdClient.builder(addr).timeout(Duration.ofSeconds(5)).build();
    }

    // ----------------------------------------------------------- waiting

    /** Polls {@code condition} until it holds, or fails after {@code timeout}. */
    static void waitUntil(Duration timeout, String what, BooleanSupplier condition) {
        long deadline = System.nanoTime() + timeout.toNanos();
        while (!condition.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("timed out after " + timeout + " waiting for " + what);
            }
            pause(Duration.ofMillis(10));
        }
    }

    /** Polls {@code supplier} until it gives a non-null value, or fails after {@code timeout}. */
    static <T> T waitFor(Duration timeout, String what, Supplier<T> supplier) {
        long deadline = System.nanoTime() + timeout.toNanos();
        while (true) {
            T value = supplier.get();
            if (value != null) {
                return value;
            }
            if (System.nanoTime() > deadline) {
                throw new AssertionError("timed out after " + timeout + " waiting for " + what);
            }
            pause(Duration.ofMillis(10));
        }
    }

    /** The poll interval of the waits above (never a wait for an outcome by itself). */
    static void pause(Duration d) {
        try {
            Thread.sleep(d.toMillis());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new AssertionError("interrupted", e);
        }
    }
}
