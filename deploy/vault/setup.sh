#!/usr/bin/env bash
# Configure Vault (or OpenBao: set VAULT_CLI=bao) for leasehold, with the
# vault CLI, following the seed article: database secrets engine, PostgreSQL
# connection, root rotation, a role that creates short-lived users, the
# Kubernetes auth method and a role bound to the app's ServiceAccount, and
# the least-privilege policy in leasehold-policy.hcl.
#
# Needs VAULT_ADDR and a token allowed to configure Vault (VAULT_TOKEN).
# Everything else has a default; override with environment variables:
#
#   DB_HOST, DB_PORT, DB_NAME        where PostgreSQL is (postgres.production.svc, 5432, appdb)
#   DB_ADMIN_USER, DB_ADMIN_PASSWORD a role that may CREATE ROLE (rotated away at once)
#   DB_SSLMODE                       require
#   DB_CONNECTION                    Vault's name for the connection (production-db)
#   ROLE                             database role and Kubernetes auth role (app-role)
#   DB_TTL, DB_MAX_TTL               credentials' TTL and max TTL (1h, 24h)
#   K8S_HOST                         API server as Vault reaches it (https://kubernetes.default.svc)
#   K8S_CA_FILE                      its CA (optional: Vault in the cluster finds its own)
#   K8S_PEM_KEYS_FILE                ServiceAccount signing public keys (optional; verifies JWTs
#                                    locally, needed where TokenReview is unavailable)
#   SA_NAME, SA_NAMESPACE            the app's ServiceAccount (app, default)
#   AUDIENCE                         audience of the projected token (vault)
#   TOKEN_TTL, TOKEN_MAX_TTL         Vault token TTLs (1h, 24h); keep TOKEN_MAX_TTL >= DB_MAX_TTL
#                                    so credentials are never re-issued because a token ends
#   POLICY_FILE                      the policy (leasehold-policy.hcl next to this script)
set -euo pipefail

vault=${VAULT_CLI:-vault}
here=$(cd "$(dirname "$0")" && pwd)

DB_HOST=${DB_HOST:-postgres.production.svc}
DB_PORT=${DB_PORT:-5432}
DB_NAME=${DB_NAME:-appdb}
DB_SSLMODE=${DB_SSLMODE:-require}
DB_CONNECTION=${DB_CONNECTION:-production-db}
DB_ADMIN_USER=${DB_ADMIN_USER:-vault_admin}
: "${DB_ADMIN_PASSWORD:?set DB_ADMIN_PASSWORD (it is rotated away right after)}"
ROLE=${ROLE:-app-role}
DB_TTL=${DB_TTL:-1h}
DB_MAX_TTL=${DB_MAX_TTL:-24h}
K8S_HOST=${K8S_HOST:-https://kubernetes.default.svc}
SA_NAME=${SA_NAME:-app}
SA_NAMESPACE=${SA_NAMESPACE:-default}
AUDIENCE=${AUDIENCE:-vault}
TOKEN_TTL=${TOKEN_TTL:-1h}
TOKEN_MAX_TTL=${TOKEN_MAX_TTL:-24h}
POLICY_FILE=${POLICY_FILE:-$here/leasehold-policy.hcl}

# 1. The database secrets engine.
"$vault" secrets enable database

# 2. The PostgreSQL connection, then rotate the root password so only Vault knows it.
"$vault" write "database/config/$DB_CONNECTION" \
  plugin_name=postgresql-database-plugin \
  allowed_roles="$ROLE" \
  connection_url="postgresql://{{username}}:{{password}}@$DB_HOST:$DB_PORT/$DB_NAME?sslmode=$DB_SSLMODE" \
  username="$DB_ADMIN_USER" \
  password="$DB_ADMIN_PASSWORD"
"$vault" write -force "database/rotate-root/$DB_CONNECTION"

# 3. The role: one PostgreSQL user per lease, dropped at revocation.
"$vault" write "database/roles/$ROLE" \
  db_name="$DB_CONNECTION" \
  creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO \"{{name}}\"; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO \"{{name}}\";" \
  revocation_statements="REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM \"{{name}}\"; REVOKE USAGE ON ALL SEQUENCES IN SCHEMA public FROM \"{{name}}\"; DROP ROLE IF EXISTS \"{{name}}\";" \
  default_ttl="$DB_TTL" \
  max_ttl="$DB_MAX_TTL"

# 4. The policy, for this role.
sed "s|database/creds/app-role|database/creds/$ROLE|" "$POLICY_FILE" | "$vault" policy write leasehold -

# 5. Kubernetes auth.
"$vault" auth enable kubernetes
config=(kubernetes_host="$K8S_HOST")
[ -n "${K8S_CA_FILE:-}" ] && config+=(kubernetes_ca_cert=@"$K8S_CA_FILE")
[ -n "${K8S_PEM_KEYS_FILE:-}" ] && config+=(pem_keys=@"$K8S_PEM_KEYS_FILE")
"$vault" write auth/kubernetes/config "${config[@]}"
"$vault" write "auth/kubernetes/role/$ROLE" \
  bound_service_account_names="$SA_NAME" \
  bound_service_account_namespaces="$SA_NAMESPACE" \
  audience="$AUDIENCE" \
  token_policies=leasehold \
  token_ttl="$TOKEN_TTL" \
  token_max_ttl="$TOKEN_MAX_TTL"

echo "Vault is configured: role $ROLE for ServiceAccount $SA_NAMESPACE/$SA_NAME."
