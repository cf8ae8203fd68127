"""From a FLOPs budget to a sparse graph: `budget` chooses static keep counts per stage that meet the budget
(`solve_keep`, over a policy's schedule), `build` makes the graph for given counts by running a policy's pass per
stage, `plan` records the result (`SparsityPlan`). May import `graph`, `passes` and `errors`; imported by `api` and
`policies`.
"""
