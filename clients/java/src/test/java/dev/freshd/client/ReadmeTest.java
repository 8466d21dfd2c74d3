package dev.freshd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.junit.jupiter.api.Test;

/** The README's quick start is the code below, and runs as written against a real server. */
class ReadmeTest {

    private static String normalized(String code) {
        return code.replaceAll("\\s+", " ").strip();
    }

    private static String between(String text, String start, String end) {
        int i = text.indexOf(start);
        assertTrue(i >= 0, "no '" + start + "'");
        int j = text.indexOf(end, i + start.length());
        assertTrue(j >= 0, "no '" + end + "' after '" + start + "'");
        return text.substring(i + start.length(), j);
    }

    @Test
    void theQuickStartIsTheCodeThatRunsHere() throws IOException {
        String readme = Files.readString(Path.of("README.md"), StandardCharsets.UTF_8);
        String documented = between(between(readme, "## Quick start", "\n## "), "```java\n", "```");
        assertTrue(documented.contains("\"127.0.0.1:50051\""));
        String source = Files.readString(
                Path.of("src/test/java/dev/freshd/client/ReadmeTest.java"), StandardCharsets.UTF_8);
        String tested = between(source, "// quick start begin\n", "// quick start end");
        assertEquals(normalized(documented.replace("\"127.0.0.1:50051\"", "server.addr()")), normalized(tested));
    }

    @Test
    void theQuickStartRuns() {
        PrintStream stdout = System.out;
        ByteArrayOutputStream captured = new ByteArrayOutputStream();
        try (FreshdServer server = FreshdServer.start()) {
            System.setOut(new PrintStream(captured, true, StandardCharsets.UTF_8));
            // quick start begin
            Map<String, String> posts = new ConcurrentHashMap<>(Map.of("posts:author:77", "hello")); // the origin
            NearCache.Loader<String> loadFeed = () -> Loaded.of(posts.get("posts:author:77"), "posts:author:77");

            try (FreshdClient client = FreshdClient.builder(server.addr()).build();
                    NearCache<String> cache = NearCache.<String>builder(client).endpoint("/feed").build()) {
                System.out.println(cache.get("feed:user:4821", loadFeed)); // miss: lease, load, fill
                System.out.println(cache.get("feed:user:4821", loadFeed)); // hit: checked, served
                posts.put("posts:author:77", "edited");
                client.publish("posts:author:77");                         // the writer's side
                System.out.println(cache.get("feed:user:4821", loadFeed)); // edited
            }
            // quick start end
        } finally {
            System.setOut(stdout);
        }
        assertEquals(List.of("hello", "hello", "edited"),
                captured.toString(StandardCharsets.UTF_8).lines().toList());
    }
}
