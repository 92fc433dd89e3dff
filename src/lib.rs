//! lb: a layer-4 TCP load balancer built on per-core mio event loops.

pub mod systemd;
