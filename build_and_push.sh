#!/usr/bin/env bash
# Build the training and serving images and push them to Amazon ECR.
#
#   ./build_and_push.sh [train|serve|all] [--tag T] [--region R] [--no-push]
#
# Tags each image with the git commit (or --tag) and `latest`, creates the ECR repositories
# imgclf-train / imgclf-serve when missing, and prints the image URIs. launch.py remembers them
# (.imgclf/images.json) as the default --image of `--target sagemaker`.
# --no-push builds locally only (no AWS account needed).
#
# Builds use the host's network (`--network host`) and pip's settings on this host (index,
# extra index, trusted hosts, CA bundle: PIP_* variables or `pip config list`), given to the
# images' builder stage only. IMGCLF_BASE_IMAGE changes the base (default debian:bookworm-slim),
# IMGCLF_ECR_PREFIX the repository names (default imgclf), and IMGCLF_REGISTRY the registry
# pushed to instead of ACCOUNT.dkr.ecr.REGION.amazonaws.com (a test registry on 127.0.0.1).
set -euo pipefail

die() {
    echo "build_and_push.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHICH="all"
TAG=""
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
PUSH=1
PREFIX="${IMGCLF_ECR_PREFIX:-imgclf}"
HOME_DIR="${IMGCLF_HOME:-$ROOT/.imgclf}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        train | serve | all) WHICH="$1" ;;
        --tag)
            [[ $# -ge 2 ]] || die "--tag needs a value"
            TAG="$2"
            shift
            ;;
        --region)
            [[ $# -ge 2 ]] || die "--region needs a value"
            REGION="$2"
            shift
            ;;
        --no-push) PUSH=0 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$1' (expected train|serve|all, --tag T, --region R, --no-push)" ;;
    esac
    shift
done

case "$WHICH" in
    all) IMAGES=(train serve) ;;
    *) IMAGES=("$WHICH") ;;
esac

# ---- fail early, with one clear line, when a tool is missing
command -v docker >/dev/null 2>&1 ||
    die "docker is not installed; install Docker (https://docs.docker.com/get-docker/) and run again"
docker info >/dev/null 2>&1 ||
    die "the Docker engine is not running or not reachable (docker info failed); start it and run again"

if [[ -z "$TAG" ]]; then
    TAG="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || true)"
    [[ -n "$TAG" ]] || die "not a git checkout; pass --tag T"
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        TAG="${TAG}-dirty"
    fi
fi

aws_account() {
    if command -v aws >/dev/null 2>&1; then
        aws sts get-caller-identity --query Account --output text 2>/dev/null
    else
        python3 -c 'import boto3; print(boto3.client("sts").get_caller_identity()["Account"])' 2>/dev/null
    fi
}

aws_region() {
    if command -v aws >/dev/null 2>&1; then
        aws configure get region 2>/dev/null || true
    else
        python3 -c 'import boto3; print(boto3.session.Session().region_name or "")' 2>/dev/null || true
    fi
}

ecr() { # ECR through the aws CLI, or boto3 where it is absent: `ecr login` | `ecr repo NAME`
    if command -v aws >/dev/null 2>&1; then
        case "$1" in
            login) aws ecr get-login-password --region "$REGION" ;;
            repo)
                aws ecr describe-repositories --repository-names "$2" --region "$REGION" \
                    >/dev/null 2>&1 || {
                    echo "creating ECR repository $2" >&2
                    aws ecr create-repository --repository-name "$2" --region "$REGION" \
                        --image-scanning-configuration scanOnPush=true >/dev/null
                }
                ;;
        esac
    else
        python3 - "$REGION" "$@" <<'PY'
import base64
import sys

import boto3
import botocore.exceptions

region, op, *names = sys.argv[1:]
client = boto3.client("ecr", region_name=region)
try:
    if op == "login":
        data = client.get_authorization_token()["authorizationData"][0]
        print(base64.b64decode(data["authorizationToken"]).decode().split(":", 1)[1])
    else:
        try:
            client.describe_repositories(repositoryNames=names)
        except client.exceptions.RepositoryNotFoundException:
            print(f"creating ECR repository {names[0]}", file=sys.stderr)
            client.create_repository(
                repositoryName=names[0], imageScanningConfiguration={"scanOnPush": True}
            )
except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
    print(f"build_and_push.sh: ECR {op}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
    fi
}

REGISTRY=""
if [[ "$PUSH" -eq 1 ]]; then
    [[ -n "$REGION" ]] || REGION="$(aws_region)"
    [[ -n "$REGION" ]] || die "no AWS region; pass --region R or set AWS_REGION"
    if [[ -n "${IMGCLF_REGISTRY:-}" ]]; then
        REGISTRY="$IMGCLF_REGISTRY"
    else
        ACCOUNT="$(aws_account)" ||
            die "no AWS credentials (sts get-caller-identity failed); run 'aws configure' or set AWS_PROFILE, or use --no-push"
        REGISTRY="${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com"
    fi
    PASSWORD="$(ecr login)" ||
        die "cannot get an ECR login token; check AWS credentials and the ecr:GetAuthorizationToken permission"
    docker login --username AWS --password-stdin "$REGISTRY" <<<"$PASSWORD" >/dev/null ||
        die "docker login to $REGISTRY failed"
fi

# ---- pip's settings on this host, for the builder stage only
pip_setting() { # PIP_<NAME>, else the last value `pip config list` shows for NAME
    local var
    var="PIP_$(tr 'a-z-' 'A-Z_' <<<"$1")"
    if [[ -n "${!var:-}" ]]; then
        echo "${!var}"
    else
        { python3 -m pip config list 2>/dev/null || pip config list 2>/dev/null || true; } |
            sed -n "s/^[a-z]*\.$1='\(.*\)'\$/\1/p" | tail -1
    fi
}

reachable_urls() { # the http(s) URLs of a list (file:// indexes are not in the build)
    local url out=()
    for url in $1; do
        [[ "$url" == http://* || "$url" == https://* ]] && out+=("$url")
    done
    echo "${out[*]:-}"
}

BUILD_ARGS=(--network host --force-rm)
[[ -z "${IMGCLF_BASE_IMAGE:-}" ]] || BUILD_ARGS+=(--build-arg "BASE_IMAGE=$IMGCLF_BASE_IMAGE")
index="$(reachable_urls "$(pip_setting index-url)")"
[[ -z "$index" ]] || BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$index")
extra="$(reachable_urls "$(pip_setting extra-index-url)")"
[[ -z "$extra" ]] || BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
trusted="$(pip_setting trusted-host)"
[[ -z "$trusted" ]] || BUILD_ARGS+=(--build-arg "PIP_TRUSTED_HOST=$trusted")
cert="$(pip_setting cert)"
CA_COPY="$ROOT/docker/build-pip/ca.pem"
if [[ -n "$cert" && -f "$cert" ]]; then
    # The builder stage copies docker/build-pip/; the runtime stage never does.
    cp "$cert" "$CA_COPY"
    trap 'rm -f "$CA_COPY"' EXIT
    BUILD_ARGS+=(--build-arg "PIP_CERT=/tmp/build-pip/ca.pem")
fi

URIS=()
for image in "${IMAGES[@]}"; do
    repo="${PREFIX}-${image}"
    local_name="${repo}:${TAG}"
    echo "building ${local_name} from docker/${image}/Dockerfile" >&2
    started=$SECONDS
    docker build "${BUILD_ARGS[@]}" --file "$ROOT/docker/${image}/Dockerfile" \
        --tag "$local_name" --tag "${repo}:latest" "$ROOT" >&2
    size="$(docker image inspect --format '{{.Size}}' "$local_name")"
    echo "built ${local_name} in $((SECONDS - started)) s: $((size / 1000000)) MB" >&2
    if [[ "$PUSH" -eq 1 ]]; then
        ecr repo "$repo" || die "cannot create ECR repository ${repo}; check the ecr:CreateRepository permission"
        for tag in "$TAG" latest; do
            docker tag "$local_name" "${REGISTRY}/${repo}:${tag}"
            docker push "${REGISTRY}/${repo}:${tag}" >&2
        done
        URIS+=("${image}=${REGISTRY}/${repo}:${TAG}")
    else
        URIS+=("${image}=${local_name}")
    fi
done

# Remembered by launch.py as the default --image (one file per checkout).
if [[ "$PUSH" -eq 1 ]]; then
    mkdir -p "$HOME_DIR"
    python3 - "$HOME_DIR/images.json" "${URIS[@]}" <<'PY'
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
known = json.loads(path.read_text()) if path.exists() else {}
known.update(dict(arg.split("=", 1) for arg in sys.argv[2:]))
path.write_text(json.dumps(known, indent=2) + "\n")
PY
fi
for uri in "${URIS[@]}"; do
    echo "$uri"
done
