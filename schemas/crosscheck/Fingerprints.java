// Prints, for each Avro schema file named on the command line, one line
// "<path>\t<fingerprint as 16 hex digits>\t<Parsing Canonical Form>", as computed by Java
// Avro (the reference implementation): SchemaNormalization.parsingFingerprint64 and
// toParsingForm. Run with the Java 17 single-file launcher:
//   java -cp '.cache/avro-java/*' schemas/crosscheck/Fingerprints.java FILE...
// Each file is parsed on its own: the memOS schemas are self-contained.

import java.io.File;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

public class Fingerprints {
    public static void main(String[] args) throws Exception {
        for (String path : args) {
            Schema schema = new Schema.Parser().parse(new File(path));
            long fingerprint = SchemaNormalization.parsingFingerprint64(schema);
            System.out.println(path + "\t" + String.format("%016x", fingerprint) + "\t"
                    + SchemaNormalization.toParsingForm(schema));
        }
    }
}
