//! The one integration-test binary: in-process clusters with fault injection and
//! multi-process clusters on 127.0.0.1 with kill -9.

mod epochs;
mod failpoints;
mod feedback;
mod forget;
mod gateway;
mod inproc;
mod learning;
mod limits;
mod model_spec;
mod multiproc;
mod recommend;
mod retention;
mod search;
mod stateless;
mod up;
