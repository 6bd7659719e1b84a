//! `freshet-worker`: the stateless trainer. The learning loop (feedback in, actor-critic
//! gradients out) is built on the PS client; until it lands, the binary checks that it can
//! reach the cluster and see the tables a trainer needs, so deployments can wire it up.

use clap::Parser;
use freshet_client::{ClientOptions, PsClient};

#[derive(Parser)]
#[command(name = "freshet-worker", version, about = "Freshet trainer")]
struct Args {
    /// PS node addresses (any of them; the client discovers the rest).
    #[arg(long, env = "FRESHET_PS", value_delimiter = ',', required = true)]
    ps: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let client = PsClient::connect(&args.ps, ClientOptions::default()).await?;
    let tables = client.list_tables().await?;
    println!(
        "freshet-worker: cluster reachable, {} shards, tables: {}",
        client.shard_count(),
        tables
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
