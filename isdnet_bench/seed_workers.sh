# Sourced by the cpu_*.sh benchmarks. each_seed COMMAND runs "COMMAND --seeds S --report $OUT/seedS" for every S in
# SEEDS, JOBS at once: worker k takes seeds k, k + JOBS, ... in order, and the call returns when all are done.
each_seed() {
    local command=$1 k i
    for ((k = 0; k < JOBS; k++)); do
        (
            for ((i = k; i < ${#SEEDS[@]}; i += JOBS)); do
                "$command" --seeds "${SEEDS[i]}" --report "$OUT/seed${SEEDS[i]}"
            done
        ) &
    done
    wait
}
