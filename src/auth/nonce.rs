//! Replay protection: remembers each client's nonces for their window.
