#!/usr/bin/env bash
# Calls the proxy with curl: a JWT (minted here with `api-key-server mint-jwt` unless
# PROXY_JWT is given), then, when an HMAC client is configured, a signed request with
# the headers from `api-key-server sign`.
#
# Environment:
#   PROXY_URL                       the proxy, e.g. http://127.0.0.1:8080
#   PROXY_JWT                       a token; or, to mint one:
#   JWT_PRIVATE_KEY, JWT_KID        the private key PEM file and its kid
#   PROXY_PRODUCT, PROXY_USER       default demo, example-user
#   PROXY_HMAC_CLIENT, PROXY_HMAC_SECRET   optional: also make a signed call
#   PROXY_EXPECT                    optional text the replies must contain
#   API_KEY_SERVER_BIN              the binary (default: api-key-server on PATH)
# Exits non-zero on any failure.
set -euo pipefail

bin=${API_KEY_SERVER_BIN:-api-key-server}
product=${PROXY_PRODUCT:-demo}
user=${PROXY_USER:-example-user}
model=${PROXY_MODEL:-gpt-4o-mini}
url="${PROXY_URL%/}/v1/chat/completions"
body="{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello\"}]}"

# Fails unless the reply is a chat completion whose text contains PROXY_EXPECT.
check() {
  local reply=$1
  python3 - "$reply" "${PROXY_EXPECT:-}" <<'PY'
import json, sys
reply, expect = sys.argv[1], sys.argv[2].lower()
text = json.loads(reply)["choices"][0]["message"]["content"] or ""
if not text or expect not in text.lower():
    sys.exit(f"unexpected reply: {reply}")
print(text)
PY
}

jwt=${PROXY_JWT:-}
if [ -z "$jwt" ]; then
  jwt=$("$bin" mint-jwt --key "$JWT_PRIVATE_KEY" --kid "$JWT_KID" --product "$product" --user "$user" --ttl 300)
fi
reply=$(curl -sS --fail-with-body --max-time 60 "$url" \
  -H "Authorization: Bearer $jwt" -H 'Content-Type: application/json' -d "$body")
echo "jwt:  $(check "$reply")"

if [ -n "${PROXY_HMAC_CLIENT:-}" ]; then
  body_file=$(mktemp)
  trap 'rm -f "$body_file"' EXIT
  printf '%s' "$body" >"$body_file"
  # `sign` prints one curl -H argument per line, single-quoted: xargs honours the quotes.
  # The secret stays in the environment (--secret-env), out of argv and shell history.
  reply=$("$bin" sign --client "$PROXY_HMAC_CLIENT" --secret-env PROXY_HMAC_SECRET \
      --product "$product" --user "$user" --body "$body_file" |
    xargs curl -sS --fail-with-body --max-time 60 "$url" \
      -H 'Content-Type: application/json' --data-binary "@$body_file")
  echo "hmac: $(check "$reply")"
fi
