# Shell helpers shared by the experiment scripts (sourced): which run folders are done or can
# resume.
# a run folder is finished when it has its report; one with checkpoints resumes
finished() { [ -e "$1/eval/final.json" ] || [ -e "$1/done" ]; }
resumable() { [ -d "$1/checkpoints" ] && ls "$1"/checkpoints/step_*.json >/dev/null 2>&1; }
