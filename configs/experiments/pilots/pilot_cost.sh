#!/bin/bash
# usage: pilot_cost.sh NAME STEPS [--set ...]; prints NAME STEPS user sys wall
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
name=$1; steps=$2; shift 2
mkdir -p ${PILOT_DIR:-/tmp/pilots}
/usr/bin/time -f "%U %S %e" -o ${PILOT_DIR:-/tmp/pilots}/$name.time ${PYTHON:-python} -m megatron_outeff.training.train \
  --config configs/experiments/pilots/bb-massive-pilot.yaml --set train.train_iters=$steps "$@" > ${PILOT_DIR:-/tmp/pilots}/$name.log 2>&1
echo "$name $steps $(cat ${PILOT_DIR:-/tmp/pilots}/$name.time) load $(cut -d' ' -f1-3 /proc/loadavg)" >> ${PILOT_DIR:-/tmp/pilots}/costs.txt
