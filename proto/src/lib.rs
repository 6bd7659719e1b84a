//! freshet-proto: the one crate that owns Freshet's wire schema.
//!
//! - `ps`, `raft`, `admin`, `command`: generated from `proto/*.proto` (never edited).
//! - [`shard_for`]: the documented id → shard hash every client and server agrees on.
//! - [`FILE_DESCRIPTOR_SET`]: served by gRPC reflection so grpcurl works without .proto files.
//! - [`FieldError`]: the one validation error, INVALID_ARGUMENT naming the field.
//! - [`catalog`]: validation of catalog items and candidate sets.
//! - [`metadata`]: names of the gRPC metadata keys Freshet sets (leader hints).

pub mod catalog;
pub mod codec;
pub mod field;

pub use field::{bounded, FieldError};

pub mod ps {
    pub mod v1 {
        tonic::include_proto!("freshet.ps.v1");
    }
}
pub mod raft {
    pub mod v1 {
        tonic::include_proto!("freshet.raft.v1");
    }
}
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("freshet.admin.v1");
    }
}
pub mod coord {
    pub mod v1 {
        tonic::include_proto!("freshet.coord.v1");
    }
}
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("freshet.gateway.v1");
    }
}
pub mod worker {
    pub mod v1 {
        tonic::include_proto!("freshet.worker.v1");
    }
}
pub mod command {
    pub mod v1 {
        tonic::include_proto!("freshet.command.v1");
    }
}

impl ps::v1::ModelConfig {
    /// The actor's loss weight. A record written before `policy_weight` existed has none
    /// and ran with 1 (prost's own `policy_weight()` would say 0).
    pub fn actor_weight(&self) -> f32 {
        self.policy_weight.unwrap_or(1.0)
    }
}

/// Encoded `FileDescriptorSet` of every Freshet proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/freshet_descriptor.bin"));

/// gRPC metadata keys.
pub mod metadata {
    /// On UNAVAILABLE from a follower: the gRPC address of the shard leader, when known.
    pub const LEADER_ADDR: &str = "freshet-leader-addr";
    /// On UNAVAILABLE from a follower: the node id of the shard leader, when known.
    pub const LEADER_ID: &str = "freshet-leader-id";
}

/// Group id of the meta Raft group (coordinator state: worker registry, seals). Data
/// shards are numbered 0..shard_count, so the largest id can never clash.
pub const META_GROUP: u32 = u32::MAX;

/// Shard of an embedding id: `splitmix64(id) % shard_count`.
///
/// splitmix64 is a bijective mixer, so consecutive ids (common for item catalogues)
/// spread evenly; it is fixed forever because the placement of every row depends on it.
///
/// # Panics
/// When `shard_count` is 0 (a validated cluster config never has that).
pub fn shard_for(id: u64, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "shard_count must be positive");
    (splitmix64(id) % u64::from(shard_count)) as u32
}

/// Shard that holds dense tensor `name`: `splitmix64(fnv1a64(name)) % shard_count`.
///
/// # Panics
/// When `shard_count` is 0.
pub fn dense_shard(name: &str, shard_count: u32) -> u32 {
    shard_for(fnv1a64(name), shard_count)
}

/// Consecutive impressions of one gateway that share a shard (see [`impression_id`]).
pub const IMPRESSION_BLOCK: u64 = 64;

/// The id of a gateway's `n`th impression: `{gateway:016x}:{n:x}`.
///
/// Such ids are routed by block: the [`IMPRESSION_BLOCK`] consecutive impressions of a
/// gateway go to one shard, and blocks spread over the shards by hash. A gateway's
/// write-behind batch (the impressions served while the previous append committed) then
/// lands on one or two shards instead of every shard: a quarter of the Raft entries,
/// fsyncs and peer messages on 4 shards, with the same spread over time.
pub fn impression_id(gateway: u64, n: u64) -> String {
    format!("{gateway:016x}:{n:x}")
}

/// Shard that holds impression `id` (and its feedback events' assignments). Ids of
/// [`impression_id`]'s form are routed by block; any other string (older gateways'
/// `{gateway:016x}-{n:x}`, or an id a caller made up) by a hash of the whole id.
///
/// # Panics
/// When `shard_count` is 0.
pub fn impression_shard(id: &str, shard_count: u32) -> u32 {
    match routed_block(id) {
        Some((gateway, block)) => shard_for(
            splitmix64(gateway) ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            shard_count,
        ),
        None => shard_for(fnv1a64(&format!("imp:{id}")), shard_count),
    }
}

/// `(gateway, n / IMPRESSION_BLOCK)` of an id exactly of [`impression_id`]'s form
/// (lower-case hex, 16 digits, `:`, 1 to 16 digits, no leading zero).
fn routed_block(id: &str) -> Option<(u64, u64)> {
    let (gw, n) = id.split_once(':')?;
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if gw.len() != 16 || n.is_empty() || n.len() > 16 || !hex(gw) || !hex(n) {
        return None;
    }
    if n.len() > 1 && n.starts_with('0') {
        return None;
    }
    let gateway = u64::from_str_radix(gw, 16).ok()?;
    let n = u64::from_str_radix(n, 16).ok()?;
    Some((gateway, n / IMPRESSION_BLOCK))
}

/// FNV-1a of a name (table names, categorical features); fixed forever because row
/// initialisers and feature ids depend on it.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The deterministic initial value of coordinate `j` of row `id` of a table with this
/// seed and name hash: uniform in [-scale, scale). Servers and gateways share it, so a
/// row never pushed reads the same everywhere.
pub fn init_value(seed: u64, name_hash: u64, id: u64, j: u64, scale: f32) -> f32 {
    let u = splitmix64(seed ^ splitmix64(name_hash ^ splitmix64(id)).wrapping_add(j));
    let unit = (u >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
    (2.0 * unit - 1.0) * scale
}

/// The splitmix64 finaliser (Steele, Lea, Flood 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impression_ids_route_by_block_and_others_by_hash() {
        let gw = 0x0123_4567_89ab_cdef;
        let id = impression_id(gw, 0x1c0);
        assert_eq!(id, "0123456789abcdef:1c0");
        assert_eq!(routed_block(&id), Some((gw, 0x1c0 / IMPRESSION_BLOCK)));
        // A block shares its shard; blocks spread over all shards.
        for n in 0..IMPRESSION_BLOCK {
            assert_eq!(
                impression_shard(&impression_id(gw, n), 4),
                impression_shard(&impression_id(gw, 0), 4)
            );
        }
        let mut seen = [0u32; 4];
        for b in 0..400 {
            seen[impression_shard(&impression_id(gw, b * IMPRESSION_BLOCK), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 60), "{seen:?}");
        // Not of the form: hashed whole, as before (older gateways' ids keep their shard).
        for other in [
            "0123456789abcdef-1c0",
            "0123456789ABCDEF:1c0",
            "0123456789abcdef:01c0",
            "0123456789abcdef:",
            "123456789abcdef:1c0",
            "0123456789abcdef:1c0:",
            "0123456789abcdef:11111111111111111",
            "",
        ] {
            assert_eq!(routed_block(other), None, "{other}");
            assert_eq!(
                impression_shard(other, 4),
                shard_for(fnv1a64(&format!("imp:{other}")), 4)
            );
        }
    }

    #[test]
    fn shard_hash_is_stable_and_spreads() {
        // Fixed values: changing the hash would move every row of every deployment.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let mut counts = [0u32; 4];
        for id in 0..40_000u64 {
            counts[shard_for(id, 4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(FILE_DESCRIPTOR_SET.len() > 100);
    }
}
