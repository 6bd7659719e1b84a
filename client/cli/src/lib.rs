//! freshet-cli: the `freshet` command-line tool's library (the binary only parses flags).
//!
//! - [`cli`]: rank, feedback, status and model commands against a running cluster.
//! - [`bench`], [`bench_serve`], [`bench_learn`]: `freshet bench ps|serve|learn`.
//! - [`replay`]: `freshet replay obd|events|gen-events` (the work is in freshet-sim).
//!
//! The local cluster (`freshet up`) is `freshet-local`; the simulator and OBD replay
//! (`freshet sim`, `freshet replay`) are `freshet-sim`.

pub mod bench;
pub mod bench_learn;
pub mod bench_serve;
pub mod cli;
pub mod replay;
