//! freshet-cli: the `freshet` command-line tool's library (the binary only parses flags).
//!
//! - [`cli`]: rank, feedback, status and model commands against a running cluster.
//! - [`bench`]: `freshet bench ps|serve|learn`, one harness for the three.
//! - [`replay`]: `freshet replay obd|events|gen-events` (the work is in freshet-sim).
//!
//! The local cluster (`freshet up`) is `freshet-local`; the simulator and OBD replay
//! (`freshet sim`, `freshet replay`) are `freshet-sim`.

pub mod bench;
pub mod cli;
pub mod replay;
