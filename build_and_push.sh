#!/usr/bin/env bash
# Build the training and serving images and push them to Amazon ECR.
#
#   ./build_and_push.sh [train|serve|all] [--tag T] [--region R] [--no-push]
#
# Tags each image with the git commit (or --tag) and `latest`, creates the ECR repositories
# imgclf-train / imgclf-serve when missing, and prints the image URIs. launch.py remembers them
# (.imgclf/images.json) as the default --image of `--target sagemaker`.
# --no-push builds locally only (no AWS account needed).
set -euo pipefail

die() {
    echo "build_and_push.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHICH="all"
TAG=""
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
PUSH=1
PREFIX="${IMGCLF_ECR_PREFIX:-imgclf}"

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

REGISTRY=""
if [[ "$PUSH" -eq 1 ]]; then
    ACCOUNT="$(aws_account)" ||
        die "no AWS credentials (sts get-caller-identity failed); run 'aws configure' or set AWS_PROFILE, or use --no-push"
    [[ -n "$REGION" ]] || REGION="$(aws_region)"
    [[ -n "$REGION" ]] || die "no AWS region; pass --region R or set AWS_REGION"
    REGISTRY="${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com"
    ecr() {
        if command -v aws >/dev/null 2>&1; then
            aws ecr "$@" --region "$REGION"
        else
            die "the aws CLI is needed to log in to ECR; install it (pip install awscli)"
        fi
    }
    ecr get-login-password | docker login --username AWS --password-stdin "$REGISTRY" >/dev/null ||
        die "docker login to $REGISTRY failed; check the ecr:GetAuthorizationToken permission"
fi

URIS=()
for image in "${IMAGES[@]}"; do
    repo="${PREFIX}-${image}"
    local_name="${repo}:${TAG}"
    echo "building ${local_name} from docker/${image}/Dockerfile" >&2
    docker build --file "$ROOT/docker/${image}/Dockerfile" --tag "$local_name" \
        --tag "${repo}:latest" "$ROOT"
    if [[ "$PUSH" -eq 1 ]]; then
        if ! ecr describe-repositories --repository-names "$repo" >/dev/null 2>&1; then
            echo "creating ECR repository ${repo}" >&2
            ecr create-repository --repository-name "$repo" \
                --image-scanning-configuration scanOnPush=true >/dev/null ||
                die "cannot create ECR repository ${repo}; check the ecr:CreateRepository permission"
        fi
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
    mkdir -p "$ROOT/.imgclf"
    python3 - "$ROOT/.imgclf/images.json" "${URIS[@]}" <<'PY'
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
