//! `freshet-worker`: parses flags, sets up tracing, binds, and runs the trainer until
//! SIGTERM or ctrl-c. All behaviour lives in the library (`freshet_worker::run`).

use anyhow::Context;
use clap::Parser;
use freshet_worker::WorkerConfig;

#[derive(Parser)]
#[command(name = "freshet-worker", version, about = "Freshet stateless trainer")]
struct Args {
    /// PS node addresses (any of them; the client discovers the rest).
    #[arg(long, env = "FRESHET_PS", value_delimiter = ',', required = true)]
    ps: Vec<String>,
    /// gRPC listen address (gateways send training examples here).
    #[arg(long, env = "FRESHET_LISTEN", default_value = "127.0.0.1:7400")]
    listen: String,
    /// Address gateways use for this worker (default: the bound listen address).
    #[arg(long, env = "FRESHET_ADVERTISE")]
    advertise: Option<String>,
    /// Prometheus /metrics listen address (off when empty).
    #[arg(long, env = "FRESHET_METRICS_LISTEN", default_value = "")]
    metrics_listen: String,
    /// Name shown to operators (default: the host name).
    #[arg(long, env = "HOSTNAME", default_value = "worker")]
    name: String,
    /// Examples per training step at most.
    #[arg(long, default_value_t = 1024)]
    batch_max: usize,
    /// How long a step waits to fill.
    #[arg(long, default_value_t = 5)]
    batch_wait_ms: u64,
    /// Own earlier steps that may be unsealed when a step pulls (0: every step sees
    /// all of this worker's earlier updates).
    #[arg(long, default_value_t = 0)]
    unsealed_steps_max: u64,
    /// How long a step waits for them before pulling anyway.
    #[arg(long, default_value_t = 250)]
    unsealed_wait_ms: u64,
    /// Validate the flags, print the resolved config, and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    freshet_runtime::exit_code("freshet-worker", run().await)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = WorkerConfig {
        ps: args.ps.clone(),
        advertise: args.advertise.clone(),
        name: args.name.clone(),
        batch_max: args.batch_max,
        batch_wait_ms: args.batch_wait_ms,
        unsealed_steps_max: args.unsealed_steps_max,
        unsealed_wait_ms: args.unsealed_wait_ms,
        ..WorkerConfig::default()
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    if args.check_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    let shutdown = freshet_runtime::shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    freshet_runtime::metrics::install();
    let metrics = if args.metrics_listen.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("binding {}", args.metrics_listen))?;
        Some(tokio::spawn(freshet_runtime::metrics::serve(
            l,
            std::future::pending::<()>(),
        )))
    };
    freshet_worker::run(config, listener, shutdown).await?;
    if let Some(m) = metrics {
        m.abort();
    }
    Ok(())
}
