//! `moltbot-bench`: the load generator for the moltbot gateway.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("moltbot-bench: the load generator is not built yet")
}
