"""The `adaspkv` command (`main`) and the subcommands of the offline side (`search`, `prune`, `eval`,
`train`). Each subcommand is a module registered under the entry-point group `adaspkv.commands`
(the demo registers its own), with HELP, add_arguments(parser) and run(args). Only this package
uses argparse."""
