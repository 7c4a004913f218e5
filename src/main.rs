//! The `moltbot` command line.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the moltbot command line is not built yet")
}
