//! The flags that shape the expert pool's placement. Every placer (each
//! scheduler and each expert-worker runs one) must compute the same placement, so
//! every member of a cluster takes the same values (the Kubernetes manifests set
//! them once, in the shared ConfigMap).

use std::time::Duration;

use crate::placement::PlacementPolicy;

/// `--expert-replicas` and `--rebalance-seconds`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct PoolArgs {
    /// Expert-workers each routed expert is placed on: a call to a worker that dies or
    /// times out is sent at once to another replica [default: 2 when there are at
    /// least two expert-workers and their memory budgets hold it, else 1]. Fewer
    /// replicas are placed for as few experts as the budgets demand.
    #[arg(long, env = "TESSERA_EXPERT_REPLICAS", value_parser = at_least_one)]
    pub expert_replicas: Option<usize>,
    /// Seconds between a scheduler's checks of the routed-token counts it measures:
    /// when a placement balanced for them would cut the expected load of the busiest
    /// worker by at least 10%, it is published (hot experts get extra replicas). 0
    /// turns rebalancing off.
    #[arg(long, env = "TESSERA_REBALANCE_SECONDS", default_value_t = DEFAULT_REBALANCE_SECONDS)]
    pub rebalance_seconds: u64,
}

/// Default for `--rebalance-seconds`.
pub const DEFAULT_REBALANCE_SECONDS: u64 = 600;

impl PoolArgs {
    /// The placement policy these flags ask for.
    pub fn policy(&self) -> PlacementPolicy {
        PlacementPolicy {
            replicas: self.expert_replicas,
        }
    }

    /// How often schedulers check the measured loads (`None`: never).
    pub fn rebalance_every(&self) -> Option<Duration> {
        (self.rebalance_seconds > 0).then(|| Duration::from_secs(self.rebalance_seconds))
    }
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pool: PoolArgs,
    }

    #[test]
    fn replicas_parse_and_zero_is_refused() {
        let cli = Cli::try_parse_from(["x", "--expert-replicas", "3"]).unwrap();
        assert_eq!(cli.pool.policy().replicas, Some(3));
        assert_eq!(
            cli.pool.rebalance_every(),
            Some(Duration::from_secs(DEFAULT_REBALANCE_SECONDS))
        );
        let err = Cli::try_parse_from(["x", "--expert-replicas", "0"])
            .err()
            .unwrap();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let off = Cli::try_parse_from(["x", "--rebalance-seconds", "0"]).unwrap();
        assert_eq!(off.pool.rebalance_every(), None);
        assert_eq!(
            Cli::try_parse_from(["x"]).unwrap().pool.policy().replicas,
            None
        );
    }
}
