//! `memosctl verify <schema> [--against <schema>] [--projection memory|tasks]`: compares a
//! rebuilt schema's views (those of the projections it holds offsets for) with the live ones (the schema the configured database URL resolves to, normally
//! `public`): per table, row counts and order-independent checksums, and the keys of the rows
//! that differ. Exit status 0 when every table is equal, 2 when any differs, 1 on an error.
//!
//! The comparison is meaningful when both sides stand at the same log position: the
//! `projection_offsets` table is compared too, and a difference there is reported first,
//! since the other differences then follow from it (rebuild `--until` the live offsets, or
//! pause writes until the projector has caught up). Read-only.

use anyhow::Context;
use clap::Args;
use memos_postgres::compare;
use memos_runtime::Config;

#[derive(Args)]
pub struct VerifyArgs {
    /// The rebuilt schema.
    pub schema: String,
    /// The schema to compare with (default: the live one).
    #[arg(long)]
    pub against: Option<String>,
    /// Which views to compare: `memory`, `tasks`, or (default) those whose offsets the
    /// rebuilt schema holds.
    #[arg(long)]
    pub projection: Option<String>,
    /// Most differing keys listed per table.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// One JSON object per table instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: VerifyArgs) -> anyhow::Result<()> {
    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    let live = match args.against {
        Some(s) => s,
        None => memos_postgres::bulk::current_schema(&pool).await?,
    };
    for schema in [&args.schema, &live] {
        if !memos_postgres::bulk::schema_exists(&pool, schema).await? {
            anyhow::bail!("E_NO_SCHEMA: schema {schema} does not exist");
        }
    }
    let projections = match args.projection {
        Some(p) => vec![p],
        None => {
            let held = compare::projections_in(&pool, &args.schema).await?;
            if held.is_empty() {
                vec!["memory".to_owned()]
            } else {
                held
            }
        }
    };
    let mut tables = Vec::new();
    for projection in &projections {
        let Some(of) = compare::tables_of(projection) else {
            anyhow::bail!("E_ARGUMENT: unknown projection {projection:?}; expected memory or tasks");
        };
        tables.extend(compare::compare_tables(&pool, &args.schema, &live, args.limit, of).await?);
    }
    let differing = tables.iter().filter(|t| !t.equal).count();
    if args.json {
        for t in &tables {
            println!("{}", serde_json::to_string(t)?);
        }
    } else {
        println!("comparing {} (left) with {live} (right)", args.schema);
        println!(
            "{:<20} {:>12} {:>12} {:<8} CHECKSUM (left / right)",
            "TABLE", "LEFT ROWS", "RIGHT ROWS", "RESULT"
        );
        for t in &tables {
            println!(
                "{:<20} {:>12} {:>12} {:<8} {} / {}",
                t.table,
                t.left_rows,
                t.right_rows,
                if t.equal { "equal" } else { "DIFFERS" },
                t.left_checksum,
                t.right_checksum
            );
        }
        for t in tables.iter().filter(|t| !t.equal) {
            println!("{}: differing rows (key, kind), at most {}:", t.table, args.limit);
            for d in &t.differences {
                println!("  {}  {}", d.key, d.kind);
            }
        }
    }
    if let Some(offsets) = tables
        .iter()
        .find(|t| t.table == "projection_offsets" && !t.equal)
    {
        eprintln!(
            "note: the two schemas stand at different log positions ({} differing offset rows); other differences may follow from that",
            offsets.differences.len()
        );
    }
    if differing > 0 {
        eprintln!(
            "E_DIFFERENT: {differing} table(s) differ between {} and {live}",
            args.schema
        );
        std::process::exit(2);
    }
    if !args.json {
        println!("equal: {} matches {live}", args.schema);
    }
    Ok(())
}
