package dev.freshd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Tokens and TLS against real servers: principals from a config file, certificates made here
 * with the JDK's keytool.
 */
class SecurityTest {
    private static final String PASS = "changeit";
    private static final Duration T = Duration.ofSeconds(5);

    /** Each principal's token; the server's config holds only their hashes. */
    private static final Map<String, String> TOKENS = new LinkedHashMap<>();
    private static final Map<String, String> SCOPES = Map.of(
            "admin", "{ \"*\" = [\"check\", \"watch\", \"fill\", \"publish\", \"purge\", \"admin\"] }",
            "feed", "{ feed = [\"check\", \"watch\", \"fill\"], \"*\" = [\"check\"] }");

    @TempDir
    static Path dir;
    static Path ca;
    static Path serverCert;
    static Path serverKey;
    static Path onlyNamedCert;
    static Path onlyNamedKey;
    static Path clientCa;
    static Path clientCert;
    static Path clientKey;
    static Path strangerCa;

    @BeforeAll
    static void pki() throws Exception {
        SecureRandom random = new SecureRandom();
        for (String name : List.of("admin", "feed")) {
            byte[] bytes = new byte[32];
            random.nextBytes(bytes);
            TOKENS.put(name, "fd_" + Base64.getUrlEncoder().withoutPadding().encodeToString(bytes));
        }
        ca = newCa("servers");
        clientCa = newCa("clients");
        strangerCa = newCa("stranger");
        serverCert = dir.resolve("server.pem");
        serverKey = dir.resolve("server.key");
        leaf("servers", "server", "localhost", "san=dns:localhost,ip:127.0.0.1", "serverAuth", serverCert, serverKey);
        onlyNamedCert = dir.resolve("named.pem");
        onlyNamedKey = dir.resolve("named.key");
        leaf("servers", "named", "freshd.test", "san=dns:freshd.test", "serverAuth", onlyNamedCert, onlyNamedKey);
        clientCert = dir.resolve("client.pem");
        clientKey = dir.resolve("client.key");
        leaf("clients", "client", "client.example", "san=dns:client.example", "clientAuth", clientCert, clientKey);
    }

    private static void keytool(String... args) throws IOException, InterruptedException {
        List<String> command = new ArrayList<>();
        command.add(Path.of(System.getProperty("java.home"), "bin", "keytool").toString());
        command.addAll(List.of(args));
        Process p = new ProcessBuilder(command).directory(dir.toFile()).redirectErrorStream(true).start();
        String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        if (!p.waitFor(60, TimeUnit.SECONDS) || p.exitValue() != 0) {
            throw new IllegalStateException("keytool " + String.join(" ", args) + " failed: " + out);
        }
    }

    private static Path newCa(String name) throws Exception {
        keytool("-genkeypair", "-alias", "ca", "-keyalg", "EC", "-groupname", "secp256r1",
                "-dname", "CN=freshd test CA " + name, "-ext", "bc:c", "-ext", "ku:c=keyCertSign,cRLSign",
                "-validity", "2", "-keystore", name + "-ca.p12", "-storetype", "PKCS12", "-storepass", PASS);
        keytool("-exportcert", "-rfc", "-alias", "ca", "-keystore", name + "-ca.p12", "-storepass", PASS,
                "-file", name + "-ca.pem");
        return dir.resolve(name + "-ca.pem");
    }

    private static void leaf(String caName, String name, String cn, String san, String usage, Path cert, Path key)
            throws Exception {
        // RSA: the server's TLS stack wants EC keys in a PKCS#8 form with the public key inside,
        // which the JDK does not write.
        keytool("-genkeypair", "-alias", "leaf", "-keyalg", "RSA", "-keysize", "2048", "-dname", "CN=" + cn,
                "-validity", "2", "-keystore", name + ".p12", "-storetype", "PKCS12", "-storepass", PASS);
        keytool("-certreq", "-alias", "leaf", "-keystore", name + ".p12", "-storepass", PASS, "-file", name + ".csr");
        keytool("-gencert", "-alias", "ca", "-keystore", caName + "-ca.p12", "-storepass", PASS,
                "-infile", name + ".csr", "-outfile", cert.getFileName().toString(), "-rfc",
                "-ext", san, "-ext", "eku=" + usage, "-validity", "2");
        KeyStore store = KeyStore.getInstance("PKCS12");
        try (InputStream in = Files.newInputStream(dir.resolve(name + ".p12"))) {
            store.load(in, PASS.toCharArray());
        }
        PrivateKey privateKey = (PrivateKey) store.getKey("leaf", PASS.toCharArray());
        String pem = "-----BEGIN PRIVATE KEY-----\n"
                + Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII)).encodeToString(privateKey.getEncoded())
                + "\n-----END PRIVATE KEY-----\n";
        Files.writeString(key, pem, StandardCharsets.US_ASCII);
    }

    private static Path config(Path where, Map<String, String> quotas) throws Exception {
        StringBuilder toml = new StringBuilder();
        for (Map.Entry<String, String> e : TOKENS.entrySet()) {
            byte[] hash = MessageDigest.getInstance("SHA-256").digest(e.getValue().getBytes(StandardCharsets.UTF_8));
            toml.append("[[auth.principals]]\n")
                    .append("name = \"").append(e.getKey()).append("\"\n")
                    .append("token_sha256 = \"").append(HexFormat.of().formatHex(hash)).append("\"\n")
                    .append("scopes = ").append(SCOPES.get(e.getKey())).append('\n');
            if (quotas.containsKey(e.getKey())) {
                toml.append("quotas = ").append(quotas.get(e.getKey())).append('\n');
            }
            toml.append('\n');
        }
        Path file = Files.createTempFile(where, "freshd", ".toml");
        Files.writeString(file, toml.toString(), StandardCharsets.UTF_8);
        return file;
    }

    private static FreshdServer authed(Map<String, String> quotas) throws Exception {
        return FreshdServer.start(Map.of("config", config(dir, quotas).toString()));
    }

    private static FreshdServer tls(Map<String, String> extra) throws Exception {
        Map<String, String> settings = new LinkedHashMap<>();
        settings.put("config", config(dir, Map.of()).toString());
        settings.put("tls_cert", serverCert.toString());
        settings.put("tls_key", serverKey.toString());
        settings.putAll(extra);
        return FreshdServer.start(settings);
    }

    // ------------------------------------------------------------ tokens

    @Test
    void aKnownTokenIsAccepted() throws Exception {
        try (FreshdServer server = authed(Map.of());
                FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin")).timeout(T).build()) {
            PublishResult published = client.publish("feed:1");
            assertEquals(published.seq(), client.check("feed:1", 0).version());
            assertEquals(published.seq(), client.stats().seq());
        }
    }

    @Test
    void aMissingOrUnknownTokenIsUnauthenticated() throws Exception {
        try (FreshdServer server = authed(Map.of())) {
            try (FreshdClient client = FreshdClient.builder(server.addr()).timeout(T).build()) {
                FreshdException.Unauthenticated missing =
                        assertThrows(FreshdException.Unauthenticated.class, () -> client.check("feed:1", 0));
                assertTrue(missing.description().contains("requires a token"), missing.description());
                assertEquals("UNAUTHENTICATED", missing.codeName());
            }
            try (FreshdClient client = FreshdClient.builder(server.addr()).token("fd_not_a_known_token").timeout(T).build()) {
                FreshdException.Unauthenticated unknown =
                        assertThrows(FreshdException.Unauthenticated.class, () -> client.check("feed:1", 0));
                assertTrue(unknown.description().contains("unknown token"), unknown.description());
                assertThrows(FreshdException.Unauthenticated.class,
                        () -> client.watch(WatchOptions.builder().subscribe("feed:").build()));
            }
        }
    }

    @Test
    void outOfScopeCallsArePermissionDenied() throws Exception {
        try (FreshdServer server = authed(Map.of());
                FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("feed")).timeout(T).build()) {
            client.fill("feed:1", List.of("posts:1")); // fill in feed, check on "*"
            client.check("posts:1", 0);
            FreshdException.PermissionDenied denied =
                    assertThrows(FreshdException.PermissionDenied.class, () -> client.publish("feed:1"));
            String message = denied.description();
            assertTrue(message.contains("\"feed\"") && message.contains("\"publish\""), message);
            FreshdException.PermissionDenied watch = assertThrows(FreshdException.PermissionDenied.class,
                    () -> client.watch(WatchOptions.builder().subscribe("posts:").build()));
            assertTrue(watch.description().contains("watch"), watch.description());
        }
    }

    @Test
    void aQuotaIsResourceExhaustedNamingIt() throws Exception {
        try (FreshdServer server = authed(Map.of("feed", "{ streams = 1 }"));
                FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("feed")).timeout(T).build();
                WatchStream first = client.watch(WatchOptions.builder().subscribe("feed:").build())) {
            FreshdException.ResourceExhausted e = assertThrows(FreshdException.ResourceExhausted.class,
                    () -> client.watch(WatchOptions.builder().subscribe("feed:").build()));
            assertTrue(e.description().contains("quota streams"), e.description());
            assertEquals(ResumeOutcome.NEW, first.started().outcome());
        }
    }

    @Test
    void unusableSettingsAreRefusedBeforeConnecting() {
        assertThrows(IllegalArgumentException.class,
                () -> FreshdClient.builder("http://127.0.0.1:1").tlsCaFile(ca).build());
        assertThrows(java.io.UncheckedIOException.class,
                () -> FreshdClient.builder("127.0.0.1:1").tlsCaFile(Path.of("/nonexistent/ca.pem")));
    }

    // --------------------------------------------------------------- TLS

    @Test
    void tlsWithACaFileOrBytes() throws Exception {
        try (FreshdServer server = tls(Map.of())) {
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).serverName("localhost").timeout(T).build()) {
                assertTrue(client.isTls());
                client.publish("feed:1");
            }
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCa(Files.readAllBytes(ca)).timeout(T).build()) {
                client.publish("feed:2");
            }
            // The certificate names 127.0.0.1 too: no override needed, https:// works.
            try (FreshdClient client = FreshdClient.builder("https://" + server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).timeout(T).build()) {
                assertTrue(client.isTls());
                assertEquals(2, client.stats().seq());
            }
        }
    }

    @Test
    void aServerNameOverrideMatchesACertificateForAnotherName() throws Exception {
        try (FreshdServer server = tls(Map.of("tls_cert", onlyNamedCert.toString(), "tls_key", onlyNamedKey.toString()))) {
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).serverName("freshd.test").timeout(T).build()) {
                client.publish("feed:1");
            }
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).timeout(T).build()) {
                assertThrows(FreshdException.Unavailable.class, () -> client.check("feed:1", 0));
            }
        }
    }

    @Test
    void tlsRefusesAServerFromAnotherCa() throws Exception {
        try (FreshdServer server = tls(Map.of())) {
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(strangerCa).serverName("localhost").timeout(Duration.ofSeconds(3)).build()) {
                assertThrows(FreshdException.Unavailable.class, () -> client.check("feed:1", 0));
            }
            // Nor does plaintext get anywhere.
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .timeout(Duration.ofSeconds(3)).build()) {
                assertThrows(FreshdException.class, () -> client.check("feed:1", 0));
            }
        }
    }

    @Test
    void mutualTlsNeedsAClientCertificate() throws Exception {
        try (FreshdServer server = tls(Map.of("tls_client_ca", clientCa.toString()))) {
            try (FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).tlsClientCertFiles(clientCert, clientKey).serverName("localhost").timeout(T).build()) {
                client.publish("feed:1");
            }
            // The handshake passes; the token is still required.
            try (FreshdClient anonymous = FreshdClient.builder(server.addr()).tlsCaFile(ca)
                    .tlsClientCert(Files.readAllBytes(clientCert), Files.readAllBytes(clientKey))
                    .serverName("localhost").timeout(T).build()) {
                assertThrows(FreshdException.Unauthenticated.class, () -> anonymous.check("feed:1", 0));
            }
            try (FreshdClient noCertificate = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                    .tlsCaFile(ca).serverName("localhost").timeout(Duration.ofSeconds(3)).build()) {
                assertThrows(FreshdException.Unavailable.class, () -> noCertificate.check("feed:1", 0));
            }
        }
    }

    @Test
    void aWatchStreamOverTlsWithATokenGetsNotices() throws Exception {
        try (FreshdServer server = tls(Map.of());
                FreshdClient reader = FreshdClient.builder(server.addr()).token(TOKENS.get("feed"))
                        .tlsCaFile(ca).serverName("localhost").timeout(T).build();
                FreshdClient writer = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                        .tlsCaFile(ca).serverName("localhost").timeout(T).build();
                WatchStream stream = reader.watch(WatchOptions.builder().clientId("reader").subscribe("feed:").build())) {
            PublishResult published = writer.publish("feed:user:1");
            SyncResult synced = stream.sync(T);
            assertEquals(1, synced.notices().size());
            assertEquals("feed:user:1", synced.notices().get(0).key());
            assertEquals(published.seq(), synced.notices().get(0).seq());
            // Past the reader's scope, nothing arrives and nothing fails.
            writer.publish("posts:1");
            assertEquals(List.of(), stream.sync(T).notices());
        }
    }

    @Test
    void aNearCacheWorksOverTlsWithAToken() throws Exception {
        Map<String, String> origin = new java.util.concurrent.ConcurrentHashMap<>(Map.of("posts:1", "hello"));
        NearCache.Loader<String> load = () -> Loaded.of(origin.get("posts:1"), "posts:1");
        try (FreshdServer server = tls(Map.of());
                FreshdClient client = FreshdClient.builder(server.addr()).token(TOKENS.get("admin"))
                        .tlsCaFile(ca).serverName("localhost").timeout(T).build();
                NearCache<String> cache = NearCache.<String>builder(client).onError(NearCache.OnError.RAISE).build()) {
            assertTrue(cache.awaitWatching(T));
            assertEquals("hello", cache.get("feed:1", load));
            origin.put("posts:1", "edited");
            client.publish("posts:1");
            assertEquals("edited", cache.get("feed:1", load));
        }
    }
}
