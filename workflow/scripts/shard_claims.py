"""Check every claim line (a bad one fails here, naming file and line) and cut the claims into
shards of `per_invocation`, one per verify invocation."""

from claimio import read_claims, write_jsonl

claims = read_claims(snakemake.input[0])
per = snakemake.params.per_invocation
shards = list(snakemake.output)
if len(shards) != -(-len(claims) // per):
    raise ValueError(
        f"{snakemake.input[0]} holds {len(claims)} claims, but the workflow planned {len(shards)} shards of {per}."
    )
for index, path in enumerate(shards):
    write_jsonl(path, claims[index * per : (index + 1) * per])
