//! The stock API's statements on `inventory` (events change it through [`super::batch`]),
//! each on one tenant's stock, in a transaction of that tenant ([`service_kit::tenancy`]).

use domain::TenantId;
use sqlx::PgConnection;

/// A stock row as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockRow {
    pub on_hand: i64,
    pub reserved: i64,
    /// Bumped by every change, events' included: the row's `ETag`.
    pub version: i64,
}

/// Which rows a [`set`] may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetWhen {
    /// Creates the sku or updates it.
    Always,
    /// Creates it only if it does not exist.
    Absent,
    /// Updates it only if it exists, and (if given) is at one of these versions.
    Exists { versions: Option<Vec<i64>> },
}

/// What [`set`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    Written(StockRow),
    /// The row was not as [`SetWhen`] required.
    Refused,
    /// The quantity is below what is reserved.
    BelowReserved,
}

pub async fn find(conn: &mut PgConnection, tenant: &TenantId, sku: &str) -> Result<Option<StockRow>, sqlx::Error> {
    sqlx::query_as!(
        StockRow,
        "SELECT on_hand, reserved, version FROM inventory WHERE tenant_id = $1 AND sku = $2",
        tenant.as_str(),
        sku,
    )
    .fetch_optional(conn)
    .await
}

/// Sets the on-hand quantity of `tenant`'s `sku`, keeping its reservations.
pub async fn set(
    conn: &mut PgConnection,
    tenant: &TenantId,
    sku: &str,
    on_hand: i64,
    when: &SetWhen,
) -> Result<SetOutcome, sqlx::Error> {
    let written = match when {
        SetWhen::Always => {
            sqlx::query_as!(
                StockRow,
                "INSERT INTO inventory (tenant_id, sku, on_hand) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, sku) DO UPDATE SET on_hand = excluded.on_hand, updated_at = now(),
                                                            version = inventory.version + 1
                 RETURNING on_hand, reserved, version",
                tenant.as_str(),
                sku,
                on_hand,
            )
            .fetch_optional(conn)
            .await
        }
        SetWhen::Absent => {
            sqlx::query_as!(
                StockRow,
                "INSERT INTO inventory (tenant_id, sku, on_hand) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, sku) DO NOTHING
                 RETURNING on_hand, reserved, version",
                tenant.as_str(),
                sku,
                on_hand,
            )
            .fetch_optional(conn)
            .await
        }
        SetWhen::Exists { versions } => {
            sqlx::query_as!(
                StockRow,
                "UPDATE inventory SET on_hand = $3, updated_at = now(), version = version + 1
                 WHERE tenant_id = $1 AND sku = $2 AND ($4::bigint[] IS NULL OR version = ANY($4))
                 RETURNING on_hand, reserved, version",
                tenant.as_str(),
                sku,
                on_hand,
                versions.as_deref(),
            )
            .fetch_optional(conn)
            .await
        }
    };
    match written {
        Ok(Some(row)) => Ok(SetOutcome::Written(row)),
        Ok(None) => Ok(SetOutcome::Refused),
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("inventory_reserved_within_on_hand") => {
            Ok(SetOutcome::BelowReserved)
        }
        Err(e) => Err(e),
    }
}
