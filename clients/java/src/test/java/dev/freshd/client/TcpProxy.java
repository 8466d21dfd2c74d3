package dev.freshd.client;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.util.ArrayList;
import java.util.List;

/**
 * A loopback TCP proxy in front of a server, to cut connections: while blocked it accepts and
 * closes at once.
 */
final class TcpProxy implements AutoCloseable {
    private final int targetPort;
    private final ServerSocket listener;
    private final List<Socket> sockets = new ArrayList<>();
    private volatile boolean blocked;
    private volatile boolean closed;

    TcpProxy(int targetPort) throws IOException {
        this.targetPort = targetPort;
        this.listener = new ServerSocket(0, 64, InetAddress.getLoopbackAddress());
        Thread acceptor = new Thread(this::accept, "proxy-accept");
        acceptor.setDaemon(true);
        acceptor.start();
    }

    String addr() {
        return "127.0.0.1:" + listener.getLocalPort();
    }

    void blocked(boolean value) {
        blocked = value;
    }

    private void accept() {
        while (!closed) {
            Socket downstream;
            try {
                downstream = listener.accept();
            } catch (IOException e) {
                return;
            }
            if (blocked) {
                closeQuietly(downstream);
                continue;
            }
            Socket upstream = new Socket();
            try {
                upstream.connect(new InetSocketAddress(InetAddress.getLoopbackAddress(), targetPort), 2000);
            } catch (IOException e) {
                closeQuietly(downstream);
                closeQuietly(upstream);
                continue;
            }
            synchronized (sockets) {
                sockets.add(downstream);
                sockets.add(upstream);
            }
            pump(downstream, upstream);
            pump(upstream, downstream);
        }
    }

    private static void pump(Socket from, Socket to) {
        Thread t = new Thread(() -> {
            byte[] buffer = new byte[65536];
            try (InputStream in = from.getInputStream(); OutputStream out = to.getOutputStream()) {
                int n;
                while ((n = in.read(buffer)) >= 0) {
                    out.write(buffer, 0, n);
                    out.flush();
                }
            } catch (IOException e) {
                // cut
            }
            closeQuietly(from);
            closeQuietly(to);
        }, "proxy-pump");
        t.setDaemon(true);
        t.start();
    }

    private static void closeQuietly(Socket s) {
        try {
            s.close();
        } catch (IOException e) {
            // closing anyway
        }
    }

    /** Closes every proxied connection. */
    void cut() {
        List<Socket> all;
        synchronized (sockets) {
            all = new ArrayList<>(sockets);
            sockets.clear();
        }
        all.forEach(TcpProxy::closeQuietly);
    }

    @Override
    public void close() throws IOException {
        closed = true;
        listener.close();
        cut();
    }
}
