//! freshd's own HTTP/2 layers, for the gRPC calls it serves: frames
//! ([`frame`]), header compression ([`hpack`]), a request's head checked
//! against HTTP/2's rules for requests ([`head`]), and the server side of a
//! connection as a state machine without I/O ([`connection`]).
//!
//! They take no lock and build no `http` types: a frame borrows from the
//! read buffer, a header field from the HPACK decoder's table or the block,
//! and a request head keeps its fields in one buffer it reuses. `conn.rs`
//! serves every accepted connection with them: its task owns the socket and
//! drives a [`connection::Connection`] (docs/ARCHITECTURE.md, "Server").

pub mod connection;
pub mod frame;
pub mod head;
pub mod hpack;
